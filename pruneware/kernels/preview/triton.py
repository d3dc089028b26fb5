"""PyramidDrop's layer-K preview fused in Triton. Same contract as ``reference.py``.

Three launches, none of which stores the normed states, q or k of the whole sequence:
  1. ``_query_kernel``, one program per (sample, query head): the last row's RMSNorm, its
     query head (both halves of the projection, so rotate-half RoPE needs no shuffle) and RoPE;
  2. ``_logits_kernel``, one program per (sample, key tile, key head): the tile's RMSNorm, its
     key head and RoPE, and the logits of the g query heads that read that key head, into a
     ``[B, H, L]`` buffer (small: one row per head, never ``L x L``);
  3. ``_softmax_kernel``, one program per sample: the masked softmax of each head's row (a masked
     key's logit is float32's lowest, as in the reference), summed over heads in a fixed order
     (deterministic, no atomics) and times the row weight.
Everything is computed in float32 whatever the input dtype (the model rounds q and k to its
dtype, hence the per-dtype tolerances of the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import validate_inputs

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _rstd(h_row_ptr, D, eps, BLOCK_D: tl.constexpr):
    """1 / sqrt(mean(h^2) + eps) of one row."""
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        h = tl.load(h_row_ptr + offs, mask=offs < D, other=0.0).to(tl.float32)
        acc += h * h
    return 1.0 / tl.sqrt(tl.sum(acc, axis=0) / D + eps)


@triton.jit
def _query_kernel(
    h_ptr, nw_ptr, wq_ptr, bq_ptr, cos_ptr, sin_ptr, q_ptr,
    H, L, D, HALF, eps, sh_b, sh_l, sc_b, sc_l, sq_b, sq_h,
    HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    row = h_ptr + b * sh_b + (L - 1) * sh_l
    rstd = _rstd(row, D, eps, BLOCK_D)
    offs_j = tl.arange(0, BLOCK_H)
    ok_j = offs_j < HALF
    first = (h * 2 * HALF + offs_j).to(tl.int64)  # rows of Wq: the head's first half
    q1 = tl.zeros([BLOCK_H], dtype=tl.float32)
    q2 = tl.zeros([BLOCK_H], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        ok_d = offs_d < D
        x = tl.load(row + offs_d, mask=ok_d, other=0.0).to(tl.float32) * rstd
        x = x * tl.load(nw_ptr + offs_d, mask=ok_d, other=0.0).to(tl.float32)
        w1 = tl.load(wq_ptr + first[:, None] * D + offs_d[None, :], mask=ok_j[:, None] & ok_d[None, :], other=0.0)
        w2 = tl.load(wq_ptr + (first + HALF)[:, None] * D + offs_d[None, :], mask=ok_j[:, None] & ok_d[None, :],
                     other=0.0)
        q1 += tl.sum(w1.to(tl.float32) * x[None, :], axis=1)
        q2 += tl.sum(w2.to(tl.float32) * x[None, :], axis=1)
    if HAS_BIAS:
        q1 += tl.load(bq_ptr + first, mask=ok_j, other=0.0).to(tl.float32)
        q2 += tl.load(bq_ptr + first + HALF, mask=ok_j, other=0.0).to(tl.float32)
    table = b * sc_b + (L - 1) * sc_l
    c1 = tl.load(cos_ptr + table + offs_j, mask=ok_j, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + table + HALF + offs_j, mask=ok_j, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + table + offs_j, mask=ok_j, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + table + HALF + offs_j, mask=ok_j, other=0.0).to(tl.float32)
    out = q_ptr + b * sq_b + h * sq_h
    tl.store(out + offs_j, q1 * c1 - q2 * s1, mask=ok_j)
    tl.store(out + HALF + offs_j, q2 * c2 + q1 * s2, mask=ok_j)


@triton.jit
def _logits_kernel(
    h_ptr, nw_ptr, wk_ptr, bk_ptr, cos_ptr, sin_ptr, q_ptr, logit_ptr,
    G, L, D, HALF, eps, scale, sh_b, sh_l, sc_b, sc_l, sq_b, sq_h, slg_b, slg_h,
    HAS_BIAS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    l0 = tl.program_id(1) * BLOCK_L
    kvh = tl.program_id(2)
    offs_l = l0 + tl.arange(0, BLOCK_L)
    ok_l = offs_l < L
    rows = h_ptr + b * sh_b + offs_l.to(tl.int64)[:, None] * sh_l
    acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(rows + offs_d[None, :], mask=ok_l[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
        acc += x * x
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=1) / D + eps)  # [BLOCK_L]
    offs_j = tl.arange(0, BLOCK_H)
    ok_j = offs_j < HALF
    first = (kvh * 2 * HALF + offs_j).to(tl.int64)
    k1 = tl.zeros([BLOCK_L, BLOCK_H], dtype=tl.float32)
    k2 = tl.zeros([BLOCK_L, BLOCK_H], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        ok_d = offs_d < D
        x = tl.load(rows + offs_d[None, :], mask=ok_l[:, None] & ok_d[None, :], other=0.0).to(tl.float32)
        x = x * rstd[:, None] * tl.load(nw_ptr + offs_d, mask=ok_d, other=0.0).to(tl.float32)[None, :]
        w1 = tl.load(wk_ptr + first[None, :] * D + offs_d[:, None], mask=ok_d[:, None] & ok_j[None, :], other=0.0)
        w2 = tl.load(wk_ptr + (first + HALF)[None, :] * D + offs_d[:, None], mask=ok_d[:, None] & ok_j[None, :],
                     other=0.0)
        k1 += tl.dot(x, w1.to(tl.float32), input_precision="ieee")
        k2 += tl.dot(x, w2.to(tl.float32), input_precision="ieee")
    if HAS_BIAS:
        k1 += tl.load(bk_ptr + first, mask=ok_j, other=0.0).to(tl.float32)[None, :]
        k2 += tl.load(bk_ptr + first + HALF, mask=ok_j, other=0.0).to(tl.float32)[None, :]
    table = b * sc_b + offs_l.to(tl.int64)[:, None] * sc_l + offs_j[None, :]
    ok = ok_l[:, None] & ok_j[None, :]
    c1 = tl.load(cos_ptr + table, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + table + HALF, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + table, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + table + HALF, mask=ok, other=0.0).to(tl.float32)
    r1 = k1 * c1 - k2 * s1  # [BLOCK_L, BLOCK_H]: the rotated key head's halves
    r2 = k2 * c2 + k1 * s2
    for g in range(0, G):
        qh = kvh * G + g
        q_row = q_ptr + b * sq_b + qh * sq_h
        q1 = tl.load(q_row + offs_j, mask=ok_j, other=0.0)
        q2 = tl.load(q_row + HALF + offs_j, mask=ok_j, other=0.0)
        logit = (tl.sum(r1 * q1[None, :], axis=1) + tl.sum(r2 * q2[None, :], axis=1)) * scale
        tl.store(logit_ptr + b * slg_b + qh * slg_h + offs_l, logit, mask=ok_l)


@triton.jit
def _masked_logits(row, mask_row, offs, L, HAS_MASK: tl.constexpr):
    """Logits at offs: -inf past L (exp gives 0), float32's lowest at a masked key (as the reference)."""
    x = tl.load(row + offs, mask=offs < L, other=float("-inf"))
    if HAS_MASK:
        real = tl.load(mask_row + offs, mask=offs < L, other=0) != 0
        x = tl.where(real | (offs >= L), x, -3.4028234663852886e38)
    return x


@triton.jit
def _softmax_kernel(
    logit_ptr, mask_ptr, w_ptr, out_ptr, H, L, slg_b, slg_h, sm_b, sw_b, so_b,
    HAS_MASK: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK_L: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    for l0 in range(0, L, BLOCK_L):
        offs = l0 + tl.arange(0, BLOCK_L)
        tl.store(out_ptr + b * so_b + offs, tl.zeros([BLOCK_L], dtype=tl.float32), mask=offs < L)
    for h in range(0, H):
        row = logit_ptr + b * slg_b + h * slg_h
        m = tl.full([BLOCK_L], float("-inf"), dtype=tl.float32)
        for l0 in range(0, L, BLOCK_L):
            offs = l0 + tl.arange(0, BLOCK_L)
            m = tl.maximum(m, _masked_logits(row, mask_ptr + b * sm_b, offs, L, HAS_MASK))
        top = tl.max(m, axis=0)
        z = tl.zeros([BLOCK_L], dtype=tl.float32)
        for l0 in range(0, L, BLOCK_L):
            offs = l0 + tl.arange(0, BLOCK_L)
            z += tl.exp(_masked_logits(row, mask_ptr + b * sm_b, offs, L, HAS_MASK) - top)
        inv = 1.0 / tl.sum(z, axis=0)
        for l0 in range(0, L, BLOCK_L):
            offs = l0 + tl.arange(0, BLOCK_L)
            p = tl.exp(_masked_logits(row, mask_ptr + b * sm_b, offs, L, HAS_MASK) - top) * inv
            acc = tl.load(out_ptr + b * so_b + offs, mask=offs < L, other=0.0)
            tl.store(out_ptr + b * so_b + offs, acc + p, mask=offs < L)
    if HAS_WEIGHTS:
        w = tl.load(w_ptr + b * sw_b).to(tl.float32)
        for l0 in range(0, L, BLOCK_L):
            offs = l0 + tl.arange(0, BLOCK_L)
            acc = tl.load(out_ptr + b * so_b + offs, mask=offs < L, other=0.0)
            tl.store(out_ptr + b * so_b + offs, acc * w, mask=offs < L)


_INTERPRETED = not isinstance(_softmax_kernel, triton.runtime.JITFunction)


def preview_scores(
    hidden: torch.Tensor, norm_weight: torch.Tensor, eps: float, wq: torch.Tensor, bq: torch.Tensor | None,
    wk: torch.Tensor, bk: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
    *, key_mask: torch.Tensor | None = None, weights: torch.Tensor | None = None, scale: float | None = None,
) -> torch.Tensor:
    """:func:`pruneware.kernels.preview.reference.preview_scores` in three Triton launches: ``[B, L]`` float32."""
    scale = validate_inputs(hidden, norm_weight, wq, bq, wk, bk, cos, sin, heads, kv_heads, key_mask, weights, scale)
    if not hidden.is_cuda and not _INTERPRETED:
        raise ValueError("preview_scores: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                         "triton is imported); PRUNEWARE_KERNELS=reference runs the plain-torch rule anywhere")
    if hidden.dtype not in _DTYPES:
        raise ValueError(f"preview_scores: the Triton kernel takes {_DTYPES}, got {hidden.dtype}")
    B, L, D = hidden.shape
    d = wq.shape[0] // heads
    half = d // 2
    hidden = hidden if hidden.stride(2) == 1 else hidden.contiguous()
    wq, wk, norm_weight = wq.contiguous(), wk.contiguous(), norm_weight.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    table_b = 0 if cos.shape[0] == 1 else cos.stride(0)
    block_d = min(max(triton.next_power_of_2(D), 16), 128)
    block_h = max(triton.next_power_of_2(half), 16)
    block_l = 32
    q = torch.empty(B, heads, d, dtype=torch.float32, device=hidden.device)
    logits = torch.empty(B, heads, L, dtype=torch.float32, device=hidden.device)
    out = torch.empty(B, L, dtype=torch.float32, device=hidden.device)
    _query_kernel[(B, heads)](
        hidden, norm_weight, wq, bq if bq is not None else wq, cos, sin, q,
        heads, L, D, half, float(eps), hidden.stride(0), hidden.stride(1), table_b, cos.stride(1),
        q.stride(0), q.stride(1), HAS_BIAS=bq is not None, BLOCK_D=block_d, BLOCK_H=block_h,
    )
    _logits_kernel[(B, triton.cdiv(L, block_l), kv_heads)](
        hidden, norm_weight, wk, bk if bk is not None else wk, cos, sin, q, logits,
        heads // kv_heads, L, D, half, float(eps), scale, hidden.stride(0), hidden.stride(1), table_b, cos.stride(1),
        q.stride(0), q.stride(1), logits.stride(0), logits.stride(1),
        HAS_BIAS=bk is not None, BLOCK_L=block_l, BLOCK_D=block_d, BLOCK_H=block_h,
    )
    mask = key_mask.contiguous() if key_mask is not None else out
    w = weights.contiguous() if weights is not None else out
    _softmax_kernel[(B,)](
        logits, mask, w, out, heads, L, logits.stride(0), logits.stride(1),
        mask.stride(0) if key_mask is not None else 0, w.stride(0) if weights is not None else 0, out.stride(0),
        HAS_MASK=key_mask is not None, HAS_WEIGHTS=weights is not None, BLOCK_L=128,
    )
    return out
