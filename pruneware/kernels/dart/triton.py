"""DART's greedy loop in one Triton launch. Same contract as ``reference.py``.

The pivots and the similarity matrix come from ``reference.prepare`` (torch: a top-k, a gather,
a concatenation and ``cosine_similarity``), so this kernel and the reference select on the same
numbers. One program per image: it marks the image pivots taken, then for each counting pivot
in turn takes its share of the free tokens least similar to it, one ``argmin`` at a time over
the pivot's similarity row held in registers (``BLOCK_N`` = n rounded up to a power of two),
taken tokens and padding lanes holding +inf. ``tl.argmin`` breaks ties to the left, as the
reference's stable sort does. On a GPU the loop is one launch instead of about ten small ops
and a host sync per pivot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import prepare, text_pivots, validate_inputs, validate_keys, validate_text

MAX_N = 32768  # a similarity row lives in registers; wider rows would spill badly


@triton.jit
def _dart_kernel(
    sim_ptr, valid_ptr, image_ptr, norms_ptr, out_ptr, N, P, P_IMG, K, s_g, s_p, v_g, i_g, n_g, o_g,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    taken = cols >= N  # padding lanes are never free
    for j in range(0, P_IMG):
        index = tl.load(image_ptr + g * i_g + j)
        taken = taken | (cols == index)
        tl.store(out_ptr + g * o_g + j, index)
    lanes = tl.arange(0, BLOCK_P)
    counting = tl.load(valid_ptr + g * v_g + lanes, mask=lanes < P, other=0)
    counted = tl.sum(counting.to(tl.int32), axis=0)
    pivots = tl.maximum(counted, 1)
    share = (K - P_IMG) // pivots
    extra = (K - P_IMG) % pivots
    position = P_IMG + tl.zeros((), tl.int32)
    turn = tl.zeros((), tl.int32)
    for i in range(0, P):
        counts = tl.load(valid_ptr + g * v_g + i).to(tl.int32)
        free = tl.sum((taken == 0).to(tl.int32), axis=0)
        take = tl.minimum(share + (turn < extra).to(tl.int32), free) * counts
        row = tl.load(sim_ptr + g * s_g + i * s_p + cols, mask=cols < N, other=float("inf")).to(tl.float32)
        row = tl.where(taken, float("inf"), row)
        for t in range(0, take):
            pick = tl.argmin(row, axis=0, tie_break_left=True).to(tl.int32)
            tl.store(out_ptr + g * o_g + position + t, pick.to(tl.int64))
            row = tl.where(cols == pick, float("inf"), row)
            taken = taken | (cols == pick)
        position += take
        turn += counts
    # No pivot at all: the largest key norms (ties to the lowest index) fill the budget.
    rest = (K - P_IMG) * (counted == 0).to(tl.int32)
    key_norms = tl.load(norms_ptr + g * n_g + cols, mask=cols < N, other=float("-inf")).to(tl.float32)
    key_norms = tl.where(taken, float("-inf"), key_norms)
    for t in range(0, rest):
        pick = tl.argmax(key_norms, axis=0, tie_break_left=True).to(tl.int32)
        tl.store(out_ptr + g * o_g + position + t, pick.to(tl.int64))
        key_norms = tl.where(cols == pick, float("-inf"), key_norms)


@triton.jit
def _rotate_back_kernel(
    key_ptr, cos_ptr, sin_ptr, out_ptr, H, L, D, HALF, k_b, k_h, k_l, o_b, o_h, o_l, t_b, t_r,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (sample, head, block of positions): k * c - rotate_half(k) * s."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    rows = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    partner = tl.where(cols < HALF, cols + HALF, cols - HALF)  # rotate_half's source channel
    sign = tl.where(cols < HALF, -1.0, 1.0)
    scale = tl.load(cos_ptr + b * t_b + t_r + cols, mask=col_ok, other=1.0).to(tl.float32)
    c = tl.load(cos_ptr + b * t_b + cols, mask=col_ok, other=0.0).to(tl.float32) / scale
    s = tl.load(sin_ptr + b * t_b + cols, mask=col_ok, other=0.0).to(tl.float32) / scale
    mask = (rows[:, None] < L) & col_ok[None, :]
    base = key_ptr + b * k_b + h * k_h + rows[:, None] * k_l
    k = tl.load(base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rotated = sign[None, :] * tl.load(base + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    out = k * c[None, :] - rotated * s[None, :]
    tl.store(out_ptr + b * o_b + h * o_h + rows[:, None] * o_l + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _key_norms_kernel(key_ptr, out_ptr, H, L, D, k_b, k_h, k_l, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (sample, block of positions): the L1 norm over every head and channel."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < L) & (cols[None, :] < D)
    total = tl.zeros((BLOCK_L,), tl.float32)
    for h in range(0, H):
        k = tl.load(key_ptr + b * k_b + h * k_h + rows[:, None] * k_l + cols[None, :], mask=mask, other=0.0)
        total += tl.sum(tl.abs(k.to(tl.float32)), axis=1)
    tl.store(out_ptr + b * L + rows, total, mask=rows < L)


_INTERPRETED = not isinstance(_dart_kernel, triton.runtime.JITFunction)


def _check_device(name: str, x: torch.Tensor) -> None:
    if not x.is_cuda and not _INTERPRETED:
        raise ValueError(
            f"{name}: the Triton backend needs CUDA tensors, got {x.device}; "
            "use PRUNEWARE_KERNELS=reference or set TRITON_INTERPRET=1 before triton is imported"
        )


def _row_strides(key: torch.Tensor) -> torch.Tensor:
    """key itself when its channels are contiguous (the kernels index rows by stride), else a copy."""
    return key if key.stride(-1) == 1 else key.contiguous()


def rotate_back(key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``reference.rotate_back`` in one launch (float32 arithmetic, rounded once to key's dtype)."""
    validate_keys(key, cos, sin)
    _check_device("rotate_back", key)
    key = _row_strides(key)
    b, h, length, d = key.shape
    out = torch.empty_like(key)  # key's layout, as the reference's
    if out.numel() == 0:
        return out
    cos, sin = cos.contiguous(), sin.contiguous()
    block_l = 32
    _rotate_back_kernel[(b * h, triton.cdiv(length, block_l))](
        key, cos, sin, out, h, length, d, d // 2, key.stride(0), key.stride(1), key.stride(2),
        out.stride(0), out.stride(1), out.stride(2), cos.stride(0), cos.stride(1),
        BLOCK_L=block_l, BLOCK_D=triton.next_power_of_2(d),
    )
    return out


def key_norms(key: torch.Tensor) -> torch.Tensor:
    """``reference.key_norms`` in one launch (float32 sums, in the kernel's order)."""
    validate_keys(key)
    _check_device("key_norms", key)
    key = _row_strides(key)
    b, h, length, d = key.shape
    out = torch.empty(b, length, dtype=torch.float32, device=key.device)
    if out.numel() == 0:
        return out
    block_l = 32
    _key_norms_kernel[(b, triton.cdiv(length, block_l))](
        key, out, h, length, d, key.stride(0), key.stride(1), key.stride(2),
        BLOCK_L=block_l, BLOCK_D=triton.next_power_of_2(d),
    )
    return out


def duplication_aware(
    visual: torch.Tensor, norms: torch.Tensor, text_pivots: torch.Tensor, text_valid: torch.Tensor, k: int,
    pivot_image: int,
) -> torch.Tensor:
    """DART's kept tokens of G images; see ``reference.duplication_aware``."""
    validate_inputs(visual, norms, text_pivots, text_valid, k, pivot_image)
    if not visual.is_cuda and not _INTERPRETED:
        raise ValueError(
            f"duplication_aware: the Triton backend needs CUDA tensors, got {visual.device}; "
            "use PRUNEWARE_KERNELS=reference or set TRITON_INTERPRET=1 before triton is imported"
        )
    g, n, _ = visual.shape
    if n > MAX_N:
        raise ValueError(f"n={n} tokens per image is over the kernel's limit of {MAX_N}; "
                         "set PRUNEWARE_KERNELS=reference to use the plain-torch path")
    if k >= n:
        return torch.arange(n, device=visual.device).expand(g, n).clone()
    if g == 0 or k == 0:
        return torch.zeros(g, 0, dtype=torch.long, device=visual.device)
    image_pivots, similarity, valid = prepare(visual, norms, text_pivots, text_valid, k, pivot_image)
    similarity, norms = similarity.contiguous(), norms.contiguous()
    valid = valid.to(torch.int8)
    out = torch.full((g, k), -1, dtype=torch.long, device=visual.device)
    p = similarity.shape[1]
    _dart_kernel[(g,)](
        similarity, valid, image_pivots, norms, out, n, p, image_pivots.shape[1], k,
        similarity.stride(0), similarity.stride(1), valid.stride(0), image_pivots.stride(0), norms.stride(0),
        out.stride(0),
        BLOCK_N=triton.next_power_of_2(n), BLOCK_P=triton.next_power_of_2(max(p, 1)),
        num_warps=4 if n <= 2048 else 8,
    )
    return out.sort(dim=1).values


def select(
    visual: torch.Tensor, norms: torch.Tensor, text_hidden: torch.Tensor, text_valid: torch.Tensor,
    text_norms: torch.Tensor, k: int, pivot_image: int, pivot_text: int,
) -> torch.Tensor:
    """DART from the text rows: the text pivots in torch (``reference.text_pivots``), then the kernel."""
    validate_text(visual, text_hidden, text_valid, text_norms, pivot_text)
    pivots, valid = text_pivots(text_hidden, text_valid, text_norms, pivot_text)
    return duplication_aware(visual, norms, pivots, valid, k, pivot_image)
