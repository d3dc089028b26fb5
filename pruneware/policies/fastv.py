"""`fastv`: keep the visual tokens the last token attends to most at layer K-1 (FastV).

The attention comes from pruneware's capture (heads averaged, the last query row only),
never from switching the model to eager attention. FastV needs K >= 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pruneware.policies.base import Policy, StageInput, register_policy


@register_policy
@dataclass(frozen=True)
class FastVPolicy(Policy):
    name = "fastv"
    needs_attention = True
    pre_llm = False
    description = "FastV: last-token attention at layer K-1, top-k at K."

    def score(self, inputs: StageInput) -> torch.Tensor:
        if inputs.attention is None:
            raise RuntimeError("fastv needs captured attention rows; the session did not provide them")
        return inputs.attention
