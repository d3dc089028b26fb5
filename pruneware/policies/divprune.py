"""`divprune`: max-min diversity over the visual tokens (DivPrune, CVPR 2025).

Greedy farthest-point selection by cosine distance: the first token is the one farthest from
its nearest neighbour, and each next token maximises its distance to the nearest token
already chosen. Runs per image under the split budget, batched over images of equal size.
The selection itself is `pruneware.kernels.divprune.max_min_diverse`: one Triton launch on
CUDA, a numpy loop on CPU, a plain-torch reference beside them.

Deliberate differences from the official code (vbdi/divprune, `DivPrune` in `llava_arch.py`),
which select the same tokens whenever no two distances tie exactly:
  - distances are computed in float32 whatever the model's dtype (official: the features' dtype);
  - a chosen token is never chosen again. Official scores chosen tokens by their own distance,
    about 0, so exact duplicates (distance 0 everywhere) can make it re-pick one and keep fewer
    than k distinct tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pruneware.kernels.divprune import max_min_diverse
from pruneware.policies.base import Policy, StageInput, image_groups, register_policy, split_budget

__all__ = ["DivPrunePolicy", "max_min_diverse"]


@register_policy
@dataclass(frozen=True)
class DivPrunePolicy(Policy):
    name = "divprune"
    description = "DivPrune: greedy max-min cosine diversity over the visual tokens."

    def select(self, inputs: StageInput, counts: list[int]) -> list[torch.Tensor] | torch.Tensor:
        sizes = inputs.image_sizes()
        device = inputs.hidden.device
        n = inputs.hidden.shape[1]
        if n and all(s == [n] for s in sizes) and len(set(counts)) == 1:
            # One full-width image per sample and one budget: the rows are the images, in order.
            return max_min_diverse(inputs.hidden, split_budget([n], counts[0])[0])  # [B, k]: sample b's in row b
        out: list[list[torch.Tensor]] = [[] for _ in sizes]
        for (_, k), items in image_groups(inputs, sizes, counts).items():
            if k == 0:
                continue
            feats = torch.stack([inputs.hidden[b, members] for b, members in items])
            picked = max_min_diverse(feats, k)
            for (b, members), row in zip(items, picked, strict=True):
                out[b].append(members[row])
        return [
            torch.cat(parts).sort().values if parts else torch.zeros(0, dtype=torch.long, device=device)
            for parts in out
        ]
