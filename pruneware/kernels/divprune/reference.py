"""DivPrune's greedy max-min selection in plain torch: the truth the fast paths must equal.

This is the rule of the official code (vbdi/divprune, `llava_arch.py`, `DivPrune`): on the
cosine distance ``1 - cos`` of the features, the first token is the one farthest from its
nearest other token, and each next token maximises its distance to the nearest token already
chosen. Ties go to the lowest index, as ``torch.argmax`` does.

Optional, not in the official code: ``spatial=w`` selects on ``1 - cos + w * g`` instead, with g
the Euclidean distance between the tokens' cells on their ``(h, w)`` grid divided by the grid's
diagonal (``grid_distance``), so tokens far apart on the image count as more different.
``spatial=0`` (the default) is the official rule, with no extra operation.
"""

from __future__ import annotations

import math

import torch


def validate_inputs(x: torch.Tensor, k: int) -> None:
    """Raise ValueError for a shape or budget the selection cannot take, naming the bad value."""
    if x.dim() != 3:
        raise ValueError(f"x must be [G, N, D], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a float tensor, got {x.dtype}")
    n = x.shape[1]
    if not 0 <= k <= n:
        raise ValueError(f"k={k} is outside [0, N={n}]")


def validate_spatial(n: int, spatial: float, grid: tuple[int, int] | None) -> None:
    """Raise ValueError for a spatial weight or grid the selection cannot take, naming the bad value."""
    if isinstance(spatial, bool) or not isinstance(spatial, int | float) or not math.isfinite(spatial) or spatial < 0:
        raise ValueError(f"spatial={spatial!r}: a finite number >= 0 (0: the official rule)")
    if spatial and (grid is None or len(grid) != 2 or grid[0] * grid[1] != n):
        raise ValueError(f"spatial={spatial} needs the tokens' (h, w) grid with h * w == N={n}, got grid={grid!r}")


def grid_distance(grid: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """[N, N] float32 Euclidean distance between the cells of an (h, w) grid, row-major (N = h * w),
    divided by the grid's diagonal, so it lies in [0, 1] (all zeros for a single cell)."""
    h, w = grid
    rows = torch.arange(h, dtype=torch.float32, device=device).repeat_interleave(w)  # [N]
    cols = torch.arange(w, dtype=torch.float32, device=device).repeat(h)  # [N]
    cells = torch.stack([rows, cols], dim=1)  # [N, 2]
    diagonal = math.hypot(h - 1, w - 1)
    return torch.cdist(cells, cells) / diagonal if diagonal else torch.zeros(h * w, h * w, device=device)


def spatial_term(spatial: float, grid: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """[N, N] float32 ``spatial * grid_distance(grid)``: what every backend adds to ``1 - cos``."""
    return grid_distance(grid, device) * spatial


def cosine_similarity(x: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between every pair of rows, in float32. x: [G, N, D] -> [G, N, N].

    Every backend selects on ``1 - `` this same matrix, so their selections agree exactly.
    """
    x = x if x.dtype == torch.float32 else x.float()
    # `normalize`'s arithmetic (x / max(||x||, eps)) without its expand: one op fewer, the same numbers.
    unit = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)
    return unit @ unit.transpose(1, 2)


def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` between every pair of rows, in float32. x: [G, N, D] -> [G, N, N]."""
    return 1.0 - cosine_similarity(x)


def selection_distance(x: torch.Tensor, spatial: float = 0.0, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """The distance the selection maximises: ``1 - cos``, plus ``spatial_term`` when spatial > 0.
    x: [G, N, D] -> [G, N, N] float32."""
    dist = cosine_distance(x)
    if spatial:
        dist += spatial_term(spatial, grid, x.device)  # type: ignore[arg-type]  # validated: a grid
    return dist


def max_min_diverse(x: torch.Tensor, k: int, spatial: float = 0.0, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Greedy max-min diverse subset. x: [G, N, D] float; returns sorted int64 indices [G, k].
    spatial, grid: the optional grid-distance term (module docstring)."""
    validate_inputs(x, k)
    g, n, _ = x.shape
    validate_spatial(n, spatial, grid)
    if k == 0:
        return torch.zeros(g, 0, dtype=torch.long, device=x.device)
    dist = selection_distance(x, spatial, grid)  # [G, N, N]
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    first = dist.masked_fill(eye, float("inf")).min(dim=2).values.argmax(dim=1)  # [G]
    chosen = torch.empty(g, k, dtype=torch.long, device=x.device)
    chosen[:, 0] = first
    rows = torch.arange(g, device=x.device)
    nearest = dist[rows, first]  # [G, N] distance to the chosen set
    taken = torch.zeros(g, n, dtype=torch.bool, device=x.device)
    taken[rows, first] = True
    for i in range(1, k):
        pick = nearest.masked_fill(taken, float("-inf")).argmax(dim=1)
        chosen[:, i] = pick
        taken[rows, pick] = True
        nearest = torch.minimum(nearest, dist[rows, pick])
    return chosen.sort(dim=1).values
