"""Grid pooling for merging policies: adaptive average pooling of an image's token grid.

Edges: a grid that does not divide by the factor is split into bins of floor/ceil sizes
(`adaptive_avg_pool2d`'s rule: bin i of n over h cells covers [floor(i*h/n), ceil((i+1)*h/n))),
so every token lands in at least one bin and nothing is dropped. Each pooled token's
representative is the first (top-left) token of its bin.
"""

from __future__ import annotations

import math
from functools import lru_cache

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


def uniform_grid(inputs: StageInput, counts: list[int]) -> tuple[int, int, int] | None:
    """(h, w, budget) when every sample holds one image that fills its N visual rows, every image
    has the grid (h, w) and every sample the same budget (known on the host, no sync): the
    images can then be merged as one batch, row b being sample b's image. None otherwise."""
    n = inputs.hidden.shape[1]
    if not n or inputs.sizes is None or len(set(counts)) != 1 or any(s != [n] for s in inputs.sizes):
        return None
    shapes = {tuple(g[0]) if len(g) == 1 else None for g in inputs.grids}
    if len(shapes) != 1 or None in shapes:
        return None
    h, w = shapes.pop()  # type: ignore[misc]
    return (h, w, split_budget([n], counts[0])[0]) if h * w == n else None


def batch_firsts(
    batch: int, h: int, w: int, ph: int, pw: int, device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """([ph*pw], the same expanded to [B, ph*pw]) long: the row-major index into an (h, w) grid
    of each (ph, pw) bin's first token. Made once per shape, device and inference mode (no op
    per forward: a memo of constants, as the engine's identity tensors); shared, never written."""
    return _firsts(batch, h, w, ph, pw, device, torch.is_inference_mode_enabled())


@lru_cache(maxsize=64)
def _firsts(
    batch: int, h: int, w: int, ph: int, pw: int, device: torch.device, inference: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    first = torch.tensor([r * w + c for r in bin_starts(h, ph) for c in bin_starts(w, pw)], device=device)
    return first, first.expand(batch, -1)


def pool_grids(x: torch.Tensor, h: int, w: int, ph: int, pw: int) -> torch.Tensor:
    """`pool_grid` for B images at once. x: [B, h*w, D], row b one image in row-major order;
    returns the pooled [B, ph*pw, D] (each image's bins, as `pool_grid` pools them)."""
    batch, _, dim = x.shape
    grid = x.reshape(batch, h, w, dim).permute(0, 3, 1, 2)  # [B, D, h, w], channels-last as pool_grid's
    grid = grid if grid.dtype == torch.float32 else grid.float()
    pooled = torch.nn.functional.adaptive_avg_pool2d(grid, (ph, pw)).permute(0, 2, 3, 1).reshape(batch, ph * pw, dim)
    return pooled if pooled.dtype == x.dtype else pooled.to(x.dtype)


def cross_attend_batched(queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """`cross_attend` for B images at once. queries: [B, P, D]; tokens: [B, N, D] -> [B, P, D]."""
    q = queries if queries.dtype == torch.float32 else queries.float()
    t = tokens if tokens.dtype == torch.float32 else tokens.float()
    weights = torch.softmax(torch.einsum("bpd,bnd->bpn", q, t) * queries.shape[-1] ** -0.5, dim=-1)  # [B, P, N]
    out = weights @ t
    return out if out.dtype == queries.dtype else out.to(queries.dtype)


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
