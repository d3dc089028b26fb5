"""PixelPrune's LOCO-I prediction distances for n unit grids at once, in plain torch: the truth the
other paths must equal.

The rule of the official code (OPPO-Mente-Lab/PixelPrune, `methods/pred_2d.py`, its vectorised
`pred_2d` path; see `pruneware.policies.pixelprune`): each unit X of an (h, w) grid is predicted
from its causal neighbours A (left), B (above) and C (above-left): the first row from A, the
first column from B, elsewhere B when C matches A but not B (a vertical edge), else A. Two units
match when their L-inf distance is 0. The result is each unit's L-inf distance to its prediction
(inf at the top-left unit, which has none).

Every comparison is a distance between two adjacent units, so two batched differences (with the
left and with the upper neighbour) give them all: C-A is the upper pair one column left, C-B the
left pair one row up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def validate_inputs(grids: torch.Tensor) -> None:
    """Raise ValueError for inputs `loco_distances` cannot take, naming the bad value."""
    if grids.dim() != 4 or not grids.is_floating_point():
        raise ValueError(f"grids must be a float [n, h, w, D] tensor, got {grids.dtype} {tuple(grids.shape)}")
    if min(grids.shape) < 1:
        raise ValueError(f"grids must have n, h, w, D >= 1, got {tuple(grids.shape)}")


def linf(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[...] L-inf distance between units x, y [..., D]."""
    return (x - y).abs().amax(dim=-1)


def loco_distances(grids: torch.Tensor) -> torch.Tensor:
    """[n, h, w] float32: each unit's L-inf distance to its LOCO-I prediction. grids: [n, h, w, D]."""
    validate_inputs(grids)
    grids = grids if grids.dtype == torch.float32 else grids.float()
    n, h, w, _ = grids.shape
    inf = float("inf")
    left = linf(grids[:, :, 1:], grids[:, :, :-1]) if w > 1 else None  # [n, h, w - 1]: X to A
    up = linf(grids[:, 1:], grids[:, :-1]) if h > 1 else None  # [n, h - 1, w]: X to B
    if left is None and up is None:
        return torch.full((n, h, w), inf, device=grids.device)
    if up is None:
        return F.pad(left, (1, 0), value=inf)
    if left is None:
        return F.pad(up, (0, 0, 1, 0), value=inf)
    use_b = (up[:, :, :-1] <= 0.0) & ~(left[:, :-1] <= 0.0)  # C matches A but not B: a vertical edge
    inner = torch.where(use_b, up[:, :, 1:], left[:, 1:])  # [n, h - 1, w - 1]
    body = torch.cat([up[:, :, :1], inner], dim=2)  # rows 1..h-1; the first column predicts from above
    return torch.cat([F.pad(left[:, :1], (1, 0), value=inf), body], dim=1)  # the first row from the left
