"""`random`: uniform random selection, reproducible from the session seed.

*All You Need Are Random Visual Tokens?* (the Information Horizon paper) finds that past
about layer 20 of 32 in LLaVA-1.5-7B, scored pruning does no better than random.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pruneware.policies.base import Policy, StageInput, register_policy
from pruneware.policies.needs import Needs


@register_policy
@dataclass(frozen=True)
class RandomPolicy(Policy):
    name = "random"
    needs = Needs(states=False)
    description = "Uniform random visual tokens (Information Horizon); seeded."

    def score(self, inputs: StageInput) -> torch.Tensor:
        # Each row draws from a generator seeded the same way, over its own token count: a
        # sample keeps the same tokens alone or in a batch, and beams of one sample agree.
        counts = inputs.token_counts()
        width = inputs.valid.shape[1]
        if all(n == width for n in counts):  # full rows (batch 1, or equal counts): every row is the same draw
            draw = torch.rand(width, generator=torch.Generator().manual_seed(inputs.seed))
            return draw.to(inputs.hidden.device, torch.float32).expand(len(counts), width)
        scores = torch.zeros(inputs.valid.shape, dtype=torch.float32)
        for b, n in enumerate(counts):
            generator = torch.Generator().manual_seed(inputs.seed)
            scores[b, :n] = torch.rand(n, generator=generator)
        return scores.to(inputs.hidden.device)
