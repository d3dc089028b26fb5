"""PixelPrune's LOCO-I distances on CPU tensors in numpy: the reference's arithmetic (differences,
absolute values and maxima are exact in IEEE floats, so the result is the reference's bit for
bit) with no torch op; arrays cross by DLPack (`pruneware.kernels.host`).
"""

from __future__ import annotations

import numpy as np
import torch

from ..host import as_numpy, as_tensor
from .reference import validate_inputs


def loco_distances(grids: torch.Tensor) -> torch.Tensor:
    """``reference.loco_distances`` on a CPU tensor: [n, h, w] float32 from grids [n, h, w, D]."""
    validate_inputs(grids)
    g = as_numpy(grids, float32=True)
    n, h, w, _ = g.shape
    dist = np.full((n, h, w), np.inf, dtype=np.float32)
    left = np.abs(g[:, :, 1:] - g[:, :, :-1]).max(axis=-1) if w > 1 else None  # [n, h, w - 1]: X to A
    up = np.abs(g[:, 1:] - g[:, :-1]).max(axis=-1) if h > 1 else None  # [n, h - 1, w]: X to B
    if left is not None:
        dist[:, 0, 1:] = left[:, 0]  # the first row predicts from the left
    if up is not None:
        dist[:, 1:, 0] = up[:, :, 0]  # the first column from above
    if left is not None and up is not None:
        with np.errstate(invalid="ignore"):  # NaN compares False, as in torch
            use_b = (up[:, :, :-1] <= 0.0) & ~(left[:, :-1] <= 0.0)  # C matches A but not B
        dist[:, 1:, 1:] = np.where(use_b, up[:, :, 1:], left[:, 1:])
    return as_tensor(dist)
