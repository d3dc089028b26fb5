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

One optional knob, off by default and not in the official code: ``divprune[spatial=w]`` selects
on ``1 - cos + w * g``, g the distance between the two tokens' cells on the image's grid divided
by the grid's diagonal (in [0, 1]). Tokens that look alike but lie far apart (two objects of one
colour) then count as different. It needs each image's full grid, so it runs where the stage sees
every token of the image (`pre`); ``spatial=0`` (the default) is the official rule exactly.
"""

from __future__ import annotations

import math
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

    spatial: float = 0.0  # weight of the grid-distance term (module docstring); 0: the official rule

    def __post_init__(self) -> None:
        w = self.spatial
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
            raise TypeError(f"spatial={w!r}: a finite number >= 0 (0: the official rule, e.g. spatial=0.25)")

    def select(self, inputs: StageInput, counts: list[int]) -> list[torch.Tensor] | torch.Tensor:
        if self.spatial:
            return self.select_spatial(inputs, counts)
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

    def select_spatial(self, inputs: StageInput, counts: list[int]) -> list[torch.Tensor]:
        """`select` with the grid term: per image, batched over images of one grid and budget.

        Raises ValueError where an image's tokens are not its whole grid (a stage after another
        pruning stage), naming the place where the knob runs."""
        groups: dict[tuple[tuple[int, int], int], list[tuple[int, torch.Tensor]]] = {}
        for b, image_sizes in enumerate(inputs.image_sizes()):
            for image, k in enumerate(split_budget(image_sizes, counts[b]) if image_sizes else []):
                members = (inputs.image_ids[b] == image).nonzero().squeeze(1)  # [n] the image's columns
                h, w = inputs.grids[b][image] if b < len(inputs.grids) and image < len(inputs.grids[b]) else (0, 0)
                if h * w != len(members):
                    raise ValueError(
                        f"divprune[spatial={self.spatial}]: image {image} of sample {b} has {len(members)} tokens, "
                        f"not its whole {h}x{w} grid; the grid term runs only where a stage sees every token "
                        "(place it at `pre`, before any other pruning stage)"
                    )
                if k:
                    groups.setdefault(((h, w), k), []).append((b, members))
        out: list[list[torch.Tensor]] = [[] for _ in counts]
        for (grid, k), items in groups.items():
            feats = torch.stack([inputs.hidden[b, members] for b, members in items])  # [G, h * w, D]
            picked = max_min_diverse(feats, k, self.spatial, grid)  # [G, k]
            for (b, members), row in zip(items, picked, strict=True):
                out[b].append(members[row])
        device = inputs.hidden.device
        return [
            torch.cat(parts).sort().values if parts else torch.zeros(0, dtype=torch.long, device=device)
            for parts in out
        ]
