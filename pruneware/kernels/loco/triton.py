"""PixelPrune's LOCO-I distances in one Triton launch: a program per (grid, block of units). Same
contract as ``reference.py``.

Each program holds ``BLOCK_U`` units of one grid and walks their D features ``BLOCK_D`` at a
time, keeping four running L-inf maxima per unit: X to A (left), X to B (above), C to A and C to
B (C: above-left); the prediction rule then picks X-B or X-A per unit. Differences, absolute
values and maxima are exact in float32, so the result equals the reference's (NaN inputs aside:
Triton's maximum does not propagate NaN as torch's amax does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import validate_inputs


@triton.jit
def _loco_kernel(
    grid_ptr, out_ptr, H, W, D, g_n, g_h, g_w, o_n,
    BLOCK_U: tl.constexpr, BLOCK_D: tl.constexpr,
):
    frame = tl.program_id(0).to(tl.int64)
    units = tl.program_id(1) * BLOCK_U + tl.arange(0, BLOCK_U)
    real = units < H * W
    r, c = units // W, units % W
    left, up = real & (c > 0), real & (r > 0)
    corner = left & up
    base = grid_ptr + frame * g_n
    x_at = base + r * g_h + c * g_w
    a_at, b_at, c_at = x_at - g_w, x_at - g_h, x_at - g_h - g_w
    xa = tl.zeros([BLOCK_U], dtype=tl.float32)
    xb = tl.zeros([BLOCK_U], dtype=tl.float32)
    ca = tl.zeros([BLOCK_U], dtype=tl.float32)
    cb = tl.zeros([BLOCK_U], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        feats = d0 + tl.arange(0, BLOCK_D)
        f_ok = (feats < D)[None, :]
        x = tl.load(x_at[:, None] + feats[None, :], mask=real[:, None] & f_ok, other=0.0).to(tl.float32)
        a = tl.load(a_at[:, None] + feats[None, :], mask=left[:, None] & f_ok, other=0.0).to(tl.float32)
        b = tl.load(b_at[:, None] + feats[None, :], mask=up[:, None] & f_ok, other=0.0).to(tl.float32)
        cc = tl.load(c_at[:, None] + feats[None, :], mask=corner[:, None] & f_ok, other=0.0).to(tl.float32)
        xa = tl.maximum(xa, tl.max(tl.abs(x - a), axis=1))
        xb = tl.maximum(xb, tl.max(tl.abs(x - b), axis=1))
        ca = tl.maximum(ca, tl.max(tl.abs(cc - a), axis=1))
        cb = tl.maximum(cb, tl.max(tl.abs(cc - b), axis=1))
    use_b = (c == 0) | (corner & (ca <= 0.0) & ~(cb <= 0.0))  # the first column, or a vertical edge
    dist = tl.where(use_b, xb, xa)
    dist = tl.where((r == 0) & (c == 0), float("inf"), dist)
    tl.store(out_ptr + frame * o_n + units, dist, mask=real)


_INTERPRETED = not isinstance(_loco_kernel, triton.runtime.JITFunction)


def loco_distances(grids: torch.Tensor) -> torch.Tensor:
    """``reference.loco_distances`` in one launch: [n, h, w] float32 from grids [n, h, w, D]."""
    validate_inputs(grids)
    if not grids.is_cuda and not _INTERPRETED:
        raise ValueError(
            f"loco_distances: the Triton backend needs CUDA tensors, got {grids.device}; "
            "use PRUNEWARE_KERNELS=reference or set TRITON_INTERPRET=1 before triton is imported"
        )
    n, h, w, dim = grids.shape
    g = grids.detach()
    if g.stride(3) != 1:
        g = g.contiguous()
    out = torch.empty(n, h, w, dtype=torch.float32, device=grids.device)
    block = 64
    _loco_kernel[(n, triton.cdiv(h * w, block))](
        g, out, h, w, dim, g.stride(0), g.stride(1), g.stride(2), out.stride(0),
        BLOCK_U=block, BLOCK_D=32, num_warps=4,
    )
    return out
