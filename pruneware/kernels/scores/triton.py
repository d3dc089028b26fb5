"""Weighted attention scores, fused in Triton. Same contract as ``reference.py``.

One program owns one sample ``b``, one key head and a tile of query rows:
the ``g = H // Hkv`` query heads that share that key head times a block of
query rows, so each key tile is loaded once per group (GQA without repeating
``k``). It sweeps the keys twice:

1. online softmax: the running row max and denominator over all key tiles;
2. the probabilities again, times ``weights[b, h, t]`` (a ``[B, T]`` weight
   is read through a head stride of 0), summed over the tile's rows into one
   partial score row ``[L]``.

Partial rows land in a small ``[B, R, L]`` buffer (``R`` = key heads x head
chunks x row blocks) that torch then sums: deterministic, unlike float
atomics, so top-k picks do not change from run to run. No ``B x H x T x L``
tensor ever exists. ``return_query_block`` keeps the per-row softmax
statistics (``[B, H, T]``) and a second kernel gathers the keys at
``query_positions`` to rebuild the ``[B, T, T]`` block among the query rows,
or its ``[B, H, T, T]`` per-head form (``T x T`` per head: small, unlike ``T x L``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .reference import validate_inputs

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
_ROWS_PER_PROGRAM = 64  # query rows (heads x positions) sharing one key tile


@triton.jit
def _logit_tile(
    q, k_base, l0, L, sk_l, sk_d, offs_d, mask_row, sm_l, pos, scale_log2,
    D: tl.constexpr, BLOCK_L: tl.constexpr, HAS_POS: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Log2-domain logits [R, BLOCK_L] of the key tile starting at l0, -inf where a key is not
    allowed (past L, padding, or after the row's causal position); both passes share it."""
    offs_l = l0 + tl.arange(0, BLOCK_L)
    kt = tl.load(
        k_base + offs_l[None, :] * sk_l + offs_d[:, None] * sk_d,
        mask=(offs_l[None, :] < L) & (offs_d[:, None] < D), other=0.0,
    )  # [BLOCK_D, BLOCK_L]
    if DOT_FP32:
        kt = kt.to(tl.float32)
    x = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale_log2
    ok = (offs_l < L)[None, :]
    if HAS_MASK:
        km = tl.load(mask_row + offs_l * sm_l, mask=offs_l < L, other=0)
        ok = ok & (km != 0)[None, :]
    if HAS_POS:
        ok = ok & (offs_l[None, :] <= pos[:, None])
    return tl.where(ok, x, float("-inf")), offs_l


@triton.jit
def _scores_kernel(
    q_ptr, k_ptr, w_ptr, pos_ptr, mask_ptr, part_ptr, m_ptr, inv_ptr,
    Hkv, G, T, L, N_CHUNKS, N_TBLOCKS,
    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_l, sk_d,
    sw_b, sw_h, sw_t, sp_b, sp_t, sm_b, sm_l, spart_b, spart_r, sst_b, sst_h,
    scale_log2,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_L: tl.constexpr, HAS_POS: tl.constexpr, HAS_MASK: tl.constexpr,
    STORE_STATS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid_bk = tl.program_id(0)
    chunk = tl.program_id(1)
    tblock = tl.program_id(2)
    b = (pid_bk // Hkv).to(tl.int64)
    kvh = (pid_bk % Hkv).to(tl.int64)
    # Row r of the tile is query head g (within the group) at query row t.
    rows = tl.arange(0, BLOCK_G * BLOCK_T)
    g = chunk * BLOCK_G + rows // BLOCK_T
    t = tblock * BLOCK_T + rows % BLOCK_T
    row_ok = (g < G) & (t < T)
    h = kvh * G + g
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(
        q_ptr + b * sq_b + h[:, None] * sq_h + t[:, None] * sq_t + offs_d[None, :] * sq_d,
        mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0,
    )  # [R, BLOCK_D]
    if DOT_FP32:
        q = q.to(tl.float32)
    w = tl.load(w_ptr + b * sw_b + h * sw_h + t * sw_t, mask=row_ok, other=0.0).to(tl.float32)
    if HAS_POS:
        pos = tl.load(pos_ptr + b * sp_b + t * sp_t, mask=row_ok, other=-1)
    else:
        pos = tl.zeros([BLOCK_G * BLOCK_T], tl.int32)  # unused: no causal mask
    k_base = k_ptr + b * sk_b + kvh * sk_h

    # Pass 1: row max and denominator, in the log2 domain (exp2 is cheaper).
    m = tl.full([BLOCK_G * BLOCK_T], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_G * BLOCK_T], tl.float32)
    for l0 in range(0, L, BLOCK_L):
        x, offs_l = _logit_tile(q, k_base, l0, L, sk_l, sk_d, offs_d, mask_ptr + b * sm_b, sm_l, pos, scale_log2,
                                D, BLOCK_L, HAS_POS, HAS_MASK, DOT_PRECISION, DOT_FP32)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        # A row with nothing allowed so far keeps max -inf; shift by 0 to avoid inf - inf.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        den = den * tl.exp2(m - m_shift) + tl.sum(tl.exp2(x - m_shift[:, None]), axis=1)
        m = m_new

    m_shift = tl.where(m == float("-inf"), 0.0, m)
    # den >= 1 once any key is allowed (the max term is exp2(0)); empty rows get 0.
    inv = tl.where(den > 0, 1.0 / tl.maximum(den, 1.0), 0.0)
    coef = w * inv
    if STORE_STATS:
        st = b * sst_b + h * sst_h + t
        tl.store(m_ptr + st, m_shift, mask=row_ok)
        tl.store(inv_ptr + st, inv, mask=row_ok)

    # Pass 2: weighted probabilities, reduced over the tile's rows.
    part_row = part_ptr + b * spart_b + ((kvh * N_CHUNKS + chunk) * N_TBLOCKS + tblock) * spart_r
    for l0 in range(0, L, BLOCK_L):
        x, offs_l = _logit_tile(q, k_base, l0, L, sk_l, sk_d, offs_d, mask_ptr + b * sm_b, sm_l, pos, scale_log2,
                                D, BLOCK_L, HAS_POS, HAS_MASK, DOT_PRECISION, DOT_FP32)
        p = tl.exp2(x - m_shift[:, None]) * coef[:, None]
        tl.store(part_row + offs_l, tl.sum(p, axis=0), mask=offs_l < L)


@triton.jit
def _query_block_kernel(
    q_ptr, k_ptr, pos_ptr, mask_ptr, m_ptr, inv_ptr, qq_ptr,
    H, G, T,
    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_l, sk_d,
    sp_b, sp_t, sm_b, sm_l, sst_b, sst_h, sqq_b, sqq_h, sqq_t,
    scale_log2,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_U: tl.constexpr,
    HAS_MASK: tl.constexpr, PER_HEAD: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # query rows
    u = tl.program_id(2) * BLOCK_U + tl.arange(0, BLOCK_U)  # query rows seen as keys
    t_ok = t < T
    u_ok = u < T
    pos_t = tl.load(pos_ptr + b * sp_b + t * sp_t, mask=t_ok, other=-1)
    pos_u = tl.load(pos_ptr + b * sp_b + u * sp_t, mask=u_ok, other=0)
    ok = t_ok[:, None] & u_ok[None, :] & (pos_u[None, :] <= pos_t[:, None])
    if HAS_MASK:
        km = tl.load(mask_ptr + b * sm_b + pos_u * sm_l, mask=u_ok, other=0)
        ok = ok & (km != 0)[None, :]
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_T, BLOCK_U], tl.float32)
    for h in range(H):
        kvh = h // G
        q = tl.load(
            q_ptr + b * sq_b + h * sq_h + t[:, None] * sq_t + offs_d[None, :] * sq_d,
            mask=t_ok[:, None] & (offs_d[None, :] < D), other=0.0,
        )  # [BLOCK_T, BLOCK_D]
        kt = tl.load(
            k_ptr + b * sk_b + kvh * sk_h + pos_u[None, :] * sk_l + offs_d[:, None] * sk_d,
            mask=u_ok[None, :] & (offs_d[:, None] < D), other=0.0,
        )  # [BLOCK_D, BLOCK_U], keys gathered at the query rows' positions
        if DOT_FP32:
            q = q.to(tl.float32)
            kt = kt.to(tl.float32)
        x = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale_log2
        st = b * sst_b + h * sst_h + t
        m = tl.load(m_ptr + st, mask=t_ok, other=0.0)
        inv = tl.load(inv_ptr + st, mask=t_ok, other=0.0)
        p = tl.exp2(tl.where(ok, x - m[:, None], float("-inf"))) * inv[:, None]
        if PER_HEAD:
            tl.store(qq_ptr + b * sqq_b + h * sqq_h + t[:, None] * sqq_t + u[None, :], p,
                     mask=t_ok[:, None] & u_ok[None, :])
        else:
            acc += p
    if not PER_HEAD:
        tl.store(qq_ptr + b * sqq_b + t[:, None] * sqq_t + u[None, :], acc, mask=t_ok[:, None] & u_ok[None, :])


# Triton 3.8 chooses interpreter or compiler once, when triton.language and
# these kernels are decorated, from TRITON_INTERPRET at that moment.
_INTERPRETED = not isinstance(_scores_kernel, triton.runtime.JITFunction)


def _tiles(group: int, T: int, D: int) -> tuple[int, int, int, int]:
    """Block sizes (d, heads of the group, query rows, keys) of one program."""
    block_d = max(16, triton.next_power_of_2(D))
    block_g = min(triton.next_power_of_2(group), _ROWS_PER_PROGRAM)
    # tl.dot wants at least 16 rows; a tile never needs more rows than T has.
    block_t = max(16 // block_g, 1, min(_ROWS_PER_PROGRAM // block_g, triton.next_power_of_2(T)))
    return block_d, block_g, block_t, 64 if block_d <= 128 else 32


def workspace_rows(H: int, Hkv: int, T: int, d: int) -> int:
    """R of the ``[B, R, L]`` fp32 partial-score buffer, the kernel's only large workspace."""
    _, block_g, block_t, _ = _tiles(H // Hkv, T, d)
    return Hkv * triton.cdiv(H // Hkv, block_g) * triton.cdiv(T, block_t)


def attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    *,
    query_positions: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_query_block: bool = False,
    per_head_block: bool = False,
    check_positions: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fused Triton version of :func:`pruneware.kernels.scores.reference.attention_scores`.

    Shapes: q ``[B, H, T, d]``, k ``[B, Hkv, L, d]``, weights ``[B, T]`` or
    ``[B, H, T]``, query_positions ``[B, T]``, key_mask ``[B, L]``; returns s
    ``[B, L]`` and qq ``[B, T, T]`` (``[B, H, T, T]`` with ``per_head_block``;
    or None), both float32. Needs CUDA tensors, or CPU
    tensors under ``TRITON_INTERPRET=1``; d up to 256; fp16, bf16 or fp32.
    """
    scale = validate_inputs(
        q, k, weights, query_positions, key_mask, scale, return_query_block, per_head_block, check_positions
    )
    if not q.is_cuda and not _INTERPRETED:
        raise ValueError(
            f"attention_scores: the Triton backend needs CUDA tensors, got {q.device}; "
            "to run it on CPU set TRITON_INTERPRET=1 before triton is first imported, "
            "or use PRUNEWARE_KERNELS=reference"
        )
    if q.dtype not in _DTYPES:
        raise ValueError(
            f"attention_scores: the Triton backend takes q/k in float16, bfloat16 or float32, "
            f"got {q.dtype}; use PRUNEWARE_KERNELS=reference"
        )
    B, H, T, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    if D > _MAX_HEAD_DIM:
        raise ValueError(
            f"attention_scores: the Triton backend supports head dim d <= {_MAX_HEAD_DIM}, "
            f"got d={D}; use PRUNEWARE_KERNELS=reference"
        )
    if B * T * L == 0:
        s = torch.zeros(B, L, dtype=torch.float32, device=q.device)
        qq = torch.zeros(B, *((H,) if per_head_block else ()), T, T, dtype=torch.float32, device=q.device)
        return s, (qq if return_query_block else None)

    G = H // Hkv
    if weights.dim() == 2:
        weights = weights[:, None, :].expand(B, H, T)  # head stride 0: one weight per row
    block_d, block_g, block_t, block_l = _tiles(G, T, D)
    n_chunks, n_tblocks = triton.cdiv(G, block_g), triton.cdiv(T, block_t)
    # The 3.8 interpreter multiplies bfloat16 as raw uint16 bits in tl.dot, so
    # it gets fp32 operands (exact for bf16); compiled kernels keep bf16.
    dot_fp32 = _INTERPRETED and q.dtype == torch.bfloat16
    precision = "ieee" if q.dtype == torch.float32 or dot_fp32 else "tf32"  # unused for 16-bit
    scale_log2 = scale * math.log2(math.e)
    # fp32 tiles at d=256 need two stages to fit the 99 KiB of shared memory on sm_86/89.
    stages = 2 if q.dtype == torch.float32 else 3

    partial = torch.empty(B, Hkv * n_chunks * n_tblocks, L, dtype=torch.float32, device=q.device)
    if return_query_block:
        row_max = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
        row_inv = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    else:
        row_max = row_inv = partial  # placeholders, never touched
    pos = query_positions if query_positions is not None else weights
    mask = key_mask.view(torch.uint8) if key_mask is not None else weights
    pos_strides = pos.stride() if query_positions is not None else (0, 0)
    mask_strides = mask.stride() if key_mask is not None else (0, 0)
    stat_strides = (H * T, T) if return_query_block else (0, 0)

    _scores_kernel[(B * Hkv, n_chunks, n_tblocks)](
        q, k, weights, pos, mask, partial, row_max, row_inv,
        Hkv, G, T, L, n_chunks, n_tblocks,
        *q.stride(), *k.stride(), *weights.stride(), *pos_strides, *mask_strides,
        *partial.stride()[:2], *stat_strides,
        scale_log2,
        D=D, BLOCK_D=block_d, BLOCK_G=block_g, BLOCK_T=block_t, BLOCK_L=block_l,
        HAS_POS=query_positions is not None, HAS_MASK=key_mask is not None,
        STORE_STATS=return_query_block, DOT_PRECISION=precision, DOT_FP32=dot_fp32,
        num_warps=4, num_stages=stages,
    )
    s = partial.sum(dim=1)
    if not return_query_block:
        return s, None

    qq = torch.empty(B, *((H,) if per_head_block else ()), T, T, dtype=torch.float32, device=q.device)
    qq_strides = (qq.stride(0), qq.stride(1), qq.stride(2)) if per_head_block else (qq.stride(0), 0, qq.stride(1))
    widest = 64 if block_d * q.element_size() <= 512 else 32  # shared memory again
    block_u = max(16, min(widest, triton.next_power_of_2(T)))
    _query_block_kernel[(B, triton.cdiv(T, block_u), triton.cdiv(T, block_u))](
        q, k, pos, mask, row_max, row_inv, qq,
        H, G, T,
        *q.stride(), *k.stride(), *pos_strides, *mask_strides, *stat_strides, *qq_strides,
        scale_log2,
        D=D, BLOCK_D=block_d, BLOCK_T=block_u, BLOCK_U=block_u,
        HAS_MASK=key_mask is not None, PER_HEAD=per_head_block, DOT_PRECISION=precision, DOT_FP32=dot_fp32,
        num_warps=4, num_stages=stages,
    )
    return s, qq
