"""Row gather with a per-sample keep index, in one Triton launch. Same contract as ``reference.py``.

Every tensor is seen as rows ``[G, Bt, L, W]`` (``G`` stacked planes for M-RoPE position
ids, ``Bt`` in ``{1, B}``, rows of ``W`` elements, unit stride inside a row) and its output
as ``[G, B, k, W]``, contiguous. The launch is a flat 1-D grid: the first programs copy
row blocks of tensor 0, the next ones row blocks of tensor 1, and so on, so one program
owns one (row block, tensor) pair and no program is launched idle. Each tensor gets its
own block shape, about 16 KiB per program: a few full rows of hidden states, dozens of
cos/sin rows, thousands of position ids.

Bandwidth comes from moving whole rows with wide vector accesses: rows are copied as
raw bits (every dtype is viewed as the integer of its width, so bf16 and fp16 share one
compiled kernel and NaN payloads survive), row strides are divisible by 16 for every
real model width, and Triton specialises on that. Up to ``MAX_SLOTS`` tensors share
one launch; more tensors take more launches.

Index values are not checked (that would cost a device sync): a position outside
``[0, L)`` reads zeros instead of faulting. The reference raises on it instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import validate_inputs

MAX_SLOTS = 4  # tensors per launch: hidden, cos, sin, positions
_TILE_BYTES = 16 * 1024  # bytes each program moves
_MAX_ROW_CHUNK_BYTES = 8 * 1024  # widest column block; wider rows loop
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _copy_block(
    src, dst, idx_ptr, blk, B, K, L, s_g, s_b, s_l,
    G: tl.constexpr, W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
    EVEN_W: tl.constexpr,
):
    # Output row r = (g * B + b) * K + j holds source row index[b, j] of plane g.
    rows = blk.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < G * B * K
    j = rows % K
    gb = rows // K
    b = gb % B
    pos = tl.load(idx_ptr + b * K + j, mask=row_ok, other=0).to(tl.int64)
    live = row_ok & (pos >= 0) & (pos < L)
    src_row = (gb // B) * s_g + b * s_b + pos * s_l
    dst_row = rows * W
    if W == 1:
        x = tl.load(src + src_row, mask=live, other=0)
        tl.store(dst + dst_row, x, mask=row_ok)
    else:
        for w0 in tl.static_range(0, W, BLOCK_W):
            cols = w0 + tl.arange(0, BLOCK_W)
            if EVEN_W:
                load_ok = live[:, None]
                store_ok = row_ok[:, None]
            else:
                load_ok = live[:, None] & (cols[None, :] < W)
                store_ok = row_ok[:, None] & (cols[None, :] < W)
            x = tl.load(src + src_row[:, None] + cols[None, :], mask=load_ok, other=0)
            tl.store(dst + dst_row[:, None] + cols[None, :], x, mask=store_ok)


@triton.jit
def _gather_kernel(
    idx_ptr, B, K, L,
    src0, dst0, sg0, sb0, sl0, src1, dst1, sg1, sb1, sl1,
    src2, dst2, sg2, sb2, sl2, src3, dst3, sg3, sb3, sl3,
    N_SLOTS: tl.constexpr,
    G0: tl.constexpr, W0: tl.constexpr, R0: tl.constexpr, C0: tl.constexpr, E0: tl.constexpr,
    G1: tl.constexpr, W1: tl.constexpr, R1: tl.constexpr, C1: tl.constexpr, E1: tl.constexpr,
    G2: tl.constexpr, W2: tl.constexpr, R2: tl.constexpr, C2: tl.constexpr, E2: tl.constexpr,
    G3: tl.constexpr, W3: tl.constexpr, R3: tl.constexpr, C3: tl.constexpr, E3: tl.constexpr,
):
    pid = tl.program_id(0)
    # Programs [0, n0) copy tensor 0, the next n1 tensor 1, ...: slots never share a program.
    end0 = tl.cdiv(G0 * B * K, R0)
    if pid < end0:
        _copy_block(src0, dst0, idx_ptr, pid, B, K, L, sg0, sb0, sl0, G0, W0, R0, C0, E0)
    if N_SLOTS > 1:
        end1 = end0 + tl.cdiv(G1 * B * K, R1)
        if (pid >= end0) & (pid < end1):
            _copy_block(src1, dst1, idx_ptr, pid - end0, B, K, L, sg1, sb1, sl1, G1, W1, R1, C1, E1)
        if N_SLOTS > 2:
            end2 = end1 + tl.cdiv(G2 * B * K, R2)
            if (pid >= end1) & (pid < end2):
                _copy_block(src2, dst2, idx_ptr, pid - end1, B, K, L, sg2, sb2, sl2, G2, W2, R2, C2, E2)
            if N_SLOTS > 3:
                end3 = end2 + tl.cdiv(G3 * B * K, R3)
                if (pid >= end2) & (pid < end3):
                    _copy_block(src3, dst3, idx_ptr, pid - end2, B, K, L, sg3, sb3, sl3, G3, W3, R3, C3, E3)


# The interpreter runs programs one at a time, so there it is worth having fewer, larger ones.
_INTERPRETED = not isinstance(_gather_kernel, triton.runtime.JITFunction)
_MIN_PROGRAMS = 8 if _INTERPRETED else 512  # keep every SM of a big GPU busy when rows allow


# Plain integer helpers: triton.next_power_of_2 and triton.cdiv cost microseconds per call in
# Triton 3.8, and at batch 1 the host time of this function is the whole cost.
def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _plan_slot(t: torch.Tensor, out: torch.Tensor, plane_dims: int, B: int, K: int) -> tuple:
    """Kernel arguments for one tensor: (src, dst, strides), (G, W, BLOCK_R, BLOCK_W, EVEN_W), blocks.

    ``t`` is ``[*planes, Bt, L, *row]`` with ``plane_dims`` leading plane dims (0 or 1) and
    at most one row dim.
    """
    shape, stride = t.shape, t.stride()
    G = shape[0] if plane_dims else 1
    W = shape[-1] if len(shape) == plane_dims + 3 else 1
    if W > 1 and stride[-1] != 1:
        t = t.contiguous()  # rows must be unit-stride for vector access; never the case for HF tensors
        stride = t.stride()
    elt = t.element_size()
    bits = _BITS[elt]
    s_g = stride[0] if plane_dims else 0
    s_b = stride[plane_dims] if shape[plane_dims] > 1 else 0  # batch-1 tables broadcast
    s_l = stride[plane_dims + 1]
    block_w = min(_pow2_ceil(W), max(1, _MAX_ROW_CHUNK_BYTES // elt))
    block_r = _pow2_floor(max(1, _TILE_BYTES // (block_w * elt)))
    rows = G * B * K
    block_r = min(block_r, _pow2_floor(rows // _MIN_PROGRAMS))  # smaller blocks when rows are few
    runtime = (t.view(bits), out.view(bits), s_g, s_b, s_l)
    meta = (G, W, block_r, block_w, W % block_w == 0)
    return runtime, meta, _cdiv(rows, block_r)


def gather_rows(
    index: torch.Tensor, *tensors: torch.Tensor, positions: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """Keep rows ``index[b]`` of every tensor in one launch (per ``MAX_SLOTS`` tensors).

    Args and returns as :func:`pruneware.kernels.gather.reference.gather_rows`.
    """
    L = validate_inputs(index, tensors, positions)
    if not index.is_cuda and not _INTERPRETED:
        raise ValueError(
            f"gather_rows: the Triton backend needs CUDA tensors, got {index.device}; "
            "use the reference backend (PRUNEWARE_KERNELS=reference) or set TRITON_INTERPRET=1 "
            "before triton is imported"
        )
    B, K = index.shape
    index = index.contiguous()
    slots, outs = [], []
    for t in tensors:
        out = torch.empty((B, K, *t.shape[2:]), dtype=t.dtype, device=t.device)
        outs.append(out)
        slots.append(_plan_slot(t, out, 0, B, K))
    if positions is not None:
        planes = positions.dim() - 2
        out = torch.empty((*positions.shape[:planes], B, K), dtype=positions.dtype, device=positions.device)
        outs.append(out)
        slots.append(_plan_slot(positions, out, planes, B, K))
    for first in range(0, len(slots), MAX_SLOTS):
        chunk = slots[first : first + MAX_SLOTS]
        programs = sum(n for _, _, n in chunk)
        if programs == 0:
            continue
        pad = MAX_SLOTS - len(chunk)
        runtime = [a for r, _, _ in chunk for a in r] + [index, index, 0, 0, 0] * pad
        meta = [m for _, ms, _ in chunk for m in ms] + [1, 1, 1, 1, True] * pad
        _gather_kernel[(programs,)](
            index, B, K, L, *runtime, len(chunk), *meta, num_warps=4,
        )
    return tuple(outs)
