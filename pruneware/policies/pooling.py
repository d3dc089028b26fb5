"""Grid pooling for merging policies: adaptive average pooling of an image's token grid.

Edges: a grid that does not divide by the factor is split into bins of floor/ceil sizes
(`adaptive_avg_pool2d`'s rule: bin i of n over h cells covers [floor(i*h/n), ceil((i+1)*h/n))),
so every token lands in at least one bin and nothing is dropped. Each pooled token's
representative is the first (top-left) token of its bin.
"""

from __future__ import annotations

import math

import torch

from pruneware.policies.base import MergeResult, StageInput, split_budget


def pooled_shape(h: int, w: int, budget: int, factor: int | None = None) -> tuple[int, int]:
    """The pooled grid for an (h, w) grid: ceil(h/f) x ceil(w/f), or the largest grid of the
    same aspect with at most `budget` cells."""
    if factor is not None:
        return math.ceil(h / factor), math.ceil(w / factor)
    budget = max(1, min(budget, h * w))
    scale = math.sqrt(budget / (h * w))
    ph = max(1, min(h, round(h * scale)))
    pw = max(1, min(w, budget // ph))
    while ph * pw > budget:
        ph -= 1
        pw = max(1, min(w, budget // max(ph, 1)))
    return max(ph, 1), pw


def bin_starts(size: int, bins: int) -> list[int]:
    return [math.floor(i * size / bins) for i in range(bins)]


def pool_grid(x: torch.Tensor, h: int, w: int, ph: int, pw: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool one image's tokens. x: [h*w, D] in row-major order.

    Returns pooled [ph*pw, D] and the row-major index [ph*pw] of each bin's first token.
    """
    grid = x.reshape(h, w, -1).permute(2, 0, 1)[None].float()  # [1, D, h, w]
    pooled = torch.nn.functional.adaptive_avg_pool2d(grid, (ph, pw))[0].permute(1, 2, 0).reshape(ph * pw, -1)
    rows = torch.tensor(bin_starts(h, ph), device=x.device)
    cols = torch.tensor(bin_starts(w, pw), device=x.device)
    first = (rows[:, None] * w + cols[None, :]).reshape(-1)
    return pooled.to(x.dtype), first


def cross_attend(queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Parameter-free scaled dot-product attention. queries: [P, D]; tokens: [N, D] -> [P, D]."""
    scale = queries.shape[-1] ** -0.5
    weights = torch.softmax(queries.float() @ tokens.float().T * scale, dim=-1)
    return (weights @ tokens.float()).to(queries.dtype)


def merge_per_image(inputs: StageInput, counts: list[int], merge_image) -> MergeResult:
    """A merging policy's ``merge``, one image at a time: each sample's budget ``counts[b]`` is
    split over its images, and ``merge_image(b, image, members, (h, w), budget)`` maps image ``image`` of sample ``b``
    (``members`` [h*w] its slots in grid order) to ``(slots [k], embeds [k, D], (ph, pw))``;
    the images' results are concatenated per sample."""
    keep, embeds, grids = [], [], []
    for b, image_sizes in enumerate(inputs.image_sizes()):
        sample_keep, sample_embeds, sample_grids = [], [], []
        budgets = split_budget(image_sizes, counts[b]) if image_sizes else []
        for image, budget in enumerate(budgets):
            h, w = inputs.grids[b][image]
            members = (inputs.image_ids[b] == image).nonzero().squeeze(1)
            if h * w != len(members):
                raise ValueError(f"image {image} of sample {b}: grid {h}x{w} but {len(members)} tokens")
            slots, merged, grid = merge_image(b, image, members, (h, w), budget)
            sample_keep.append(slots)
            sample_embeds.append(merged)
            sample_grids.append(grid)
        if sample_keep:
            keep.append(torch.cat(sample_keep))
            embeds.append(torch.cat(sample_embeds))
        else:
            keep.append(torch.zeros(0, dtype=torch.long, device=inputs.hidden.device))
            embeds.append(inputs.hidden.new_zeros(0, inputs.hidden.shape[-1]))
        grids.append(sample_grids)
    return MergeResult(keep, embeds, grids)
