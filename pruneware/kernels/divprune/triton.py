"""DivPrune's whole greedy max-min selection in one Triton launch. Same contract as ``reference.py``.

The distance matrix comes from ``selection_distance`` (a normalise, one batched matmul on cuBLAS
and ``1 -`` in torch, plus the optional grid term), so this kernel and the reference select on
the same numbers. The launch has one program per group (image): it finds the first token with a tiled pass over its
``[N, N]`` block, then runs the k - 1 dependent steps in a loop, holding the running minimum
distance to the chosen set in registers (``BLOCK_N`` = N rounded up to a power of two) and
reading one row of the matrix per step. Chosen tokens and padding lanes hold -inf, which a
minimum never raises, so no separate mask is kept. Ties go to the lowest index: within a
block ``tl.argmax`` breaks ties to the left, and across row blocks only a strictly larger
value replaces the best so far. On a GPU the selection is then one launch instead of about
five small ones per kept token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import selection_distance, validate_inputs, validate_spatial

MAX_N = 32768  # the running minimum lives in registers; wider rows would spill badly
_TILE = 8192  # elements of the [BLOCK_R, BLOCK_N] tile of the first pass


@triton.jit
def _max_min_kernel(
    dist_ptr, out_ptr, N, K, s_g, s_r, o_g,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    base = dist_ptr + g * s_g
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    # First token: the row whose minimum off-diagonal distance is largest.
    best_val = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.full((), 0, tl.int32)
    for r0 in range(0, N, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        ok = (rows[:, None] < N) & col_ok[None, :] & (rows[:, None] != cols[None, :])
        tile = tl.load(base + rows[:, None].to(tl.int64) * s_r + cols[None, :], mask=ok, other=float("inf"))
        row_min = tl.where(rows < N, tl.min(tile, axis=1), float("-inf"))  # [BLOCK_R]
        blk_val = tl.max(row_min, axis=0)
        blk_idx = tl.argmax(row_min, axis=0, tie_break_left=True).to(tl.int32) + r0
        better = blk_val > best_val
        best_idx = tl.where(better, blk_idx, best_idx)
        best_val = tl.where(better, blk_val, best_val)
    pick = best_idx
    tl.store(out_ptr + g * o_g, pick.to(tl.int64))
    nearest = tl.load(base + pick.to(tl.int64) * s_r + cols, mask=col_ok, other=float("-inf"))
    nearest = tl.where(cols == pick, float("-inf"), nearest)
    for i in range(1, K):
        pick = tl.argmax(nearest, axis=0, tie_break_left=True).to(tl.int32)
        tl.store(out_ptr + g * o_g + i, pick.to(tl.int64))
        row = tl.load(base + pick.to(tl.int64) * s_r + cols, mask=col_ok, other=float("-inf"))
        nearest = tl.minimum(nearest, row)
        nearest = tl.where(cols == pick, float("-inf"), nearest)


_INTERPRETED = not isinstance(_max_min_kernel, triton.runtime.JITFunction)


def max_min_diverse(x: torch.Tensor, k: int, spatial: float = 0.0, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Greedy max-min diverse subset. x: [G, N, D] float; returns sorted int64 indices [G, k].
    spatial, grid: the optional grid-distance term (``reference.py``)."""
    validate_inputs(x, k)
    if not x.is_cuda and not _INTERPRETED:
        raise ValueError(
            f"max_min_diverse: the Triton backend needs CUDA tensors, got {x.device}; "
            "use PRUNEWARE_KERNELS=reference or set TRITON_INTERPRET=1 before triton is imported"
        )
    g, n, _ = x.shape
    validate_spatial(n, spatial, grid)
    if n > MAX_N:
        raise ValueError(f"N={n} tokens per image is over the kernel's limit of {MAX_N}; "
                         "set PRUNEWARE_KERNELS=reference to use the plain-torch path")
    if k == 0 or g == 0:
        return torch.zeros(g, 0, dtype=torch.long, device=x.device)
    dist = selection_distance(x, spatial, grid).contiguous()  # [G, N, N]
    out = torch.full((g, k), -1, dtype=torch.long, device=x.device)
    block_n = triton.next_power_of_2(n)
    block_r = max(1, min(_TILE // block_n, triton.next_power_of_2(n)))
    warps = 4 if block_n <= 2048 else 8 if block_n <= 8192 else 16
    _max_min_kernel[(g,)](
        dist, out, n, k, dist.stride(0), dist.stride(1), out.stride(0),
        BLOCK_N=block_n, BLOCK_R=block_r, num_warps=warps,
    )
    return out.sort(dim=1).values
