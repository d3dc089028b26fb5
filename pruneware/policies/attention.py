"""The shared scoring path of attention-guided policies (FastV, AdaptInfer).

At the layer before a stage, the session takes the policy's query rows (`Needs.query`: the
last token, every text token, or the text after the last visual token), asks `row_weights` how
much each row counts (one weight per row, or one per head and row), and scores every visual
token by the weighted attention those rows pay it, summed over heads:
    s[b, l] = sum_h sum_t w[b, (h,) t] * softmax(q_ht . k_h / sqrt(d))[l]
computed by `pruneware.kernels.scores` without materialising the attention matrix.
FastV is the special case w = 1 on the last token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pruneware.policies.base import Policy, StageInput
from pruneware.policies.needs import Needs


@dataclass(frozen=True)
class AttentionPolicy(Policy):
    """A convenience base: scored by the attention rows the engine captured at layer K-1.

    Subclasses refine `needs` (e.g. `Needs(attention="previous", query="post-image")`) and may
    override `row_weights`; the engine reads only `needs`, never this class.
    """

    needs: ClassVar[Needs] = Needs(attention="previous")

    def score(self, inputs: StageInput) -> torch.Tensor:
        if inputs.attention is None:
            raise RuntimeError(f"{self.name} needs captured attention rows; the session did not provide them")
        return inputs.attention
