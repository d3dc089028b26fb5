"""SparseVLM's raters and recycling as Triton kernels, one program per sample. Same contract as
``reference.py``.

``text_raters``: the visual-by-text logits come from one batched matmul (cuBLAS, in torch); one
launch then takes, per sample, the softmax of each visual row over its text columns, their mean,
and the comparison with the mean (the per-sample masks live in registers, ``BLOCK_L`` lanes).

``recycle``: one launch does the whole recycling of a sample: the pruned set (its first n slots
minus the kept ones), the top-rated ``M`` of them, the DPC-kNN clustering on their ``[M, M]``
distances (held in registers, ``BLOCK_M`` = M rounded up to a power of two), the merged states,
and the output (the kept and recycled slots in slot order with their states). The counts (M and
the clusters C per sample, the output width) are known on the host from the plan: no sync.
Top-k ties go to the lowest index (``tl.argmax``/``tl.argmin`` break ties to the left); the
CPU paths follow torch's top-k order, so exact ties can place merged tokens differently.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import rated_count, recycled_count, validate_raters, validate_recycle

MAX_L = 16384  # text_raters holds a row of L lanes in registers
MAX_M = 512  # recycle holds an [M, M] distance tile in registers


@triton.jit
def _raters_kernel(logits_ptr, visual_ptr, text_ptr, out_ptr, L, s_b, s_r, m_b, BLOCK_L: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_L)
    in_row = cols < L
    text = tl.load(text_ptr + b * m_b + cols, mask=in_row, other=0) != 0
    visual = tl.load(visual_ptr + b * m_b + cols, mask=in_row, other=0) != 0
    n_text = tl.sum(text.to(tl.int32), axis=0)
    n_visual = tl.sum(visual.to(tl.int32), axis=0)
    total = tl.zeros([BLOCK_L], dtype=tl.float32)
    for i in range(0, L):
        is_visual = tl.load(visual_ptr + b * m_b + i) != 0
        if is_visual & (n_text > 0):
            row = tl.load(logits_ptr + b * s_b + i * s_r + cols, mask=text, other=float("-inf"))
            row = tl.exp(row - tl.max(row, axis=0))
            row = tl.where(text, row, 0.0)
            total += row / tl.sum(row, axis=0)
    relevance = total / tl.maximum(n_visual, 1).to(tl.float32)
    mean = tl.sum(tl.where(text, relevance, 0.0), axis=0) / tl.maximum(n_text, 1).to(tl.float32)
    rater = text & (relevance > mean) & (n_visual > 0)
    tl.store(out_ptr + b * m_b + cols, rater.to(tl.int8), mask=in_row)


def text_raters(embeds: torch.Tensor, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """[B, L] bool raters; see ``reference.text_raters``."""
    validate_raters(embeds, visual, text)
    _check_device(embeds)
    batch, length, _ = embeds.shape
    if length > MAX_L:
        raise ValueError(f"L={length} slots is over the kernel's limit of {MAX_L}; "
                         "set PRUNEWARE_KERNELS=reference to use the plain-torch path")
    x = embeds.detach().float()
    logits = torch.bmm(x, x.transpose(1, 2))  # [B, L, L]; only visual rows and text columns are read
    out = torch.empty(batch, length, dtype=torch.int8, device=embeds.device)
    if batch:
        vis, txt = visual.contiguous().view(torch.int8), text.contiguous().view(torch.int8)
        _raters_kernel[(batch,)](logits, vis, txt, out, length, logits.stride(0), logits.stride(1), length,
                                 BLOCK_L=triton.next_power_of_2(length))
    return out.view(torch.bool)


@triton.jit
def _recycle_kernel(
    hidden_ptr, scores_ptr, kept_ptr, sizes_ptr, rated_ptr, out_idx_ptr, out_ptr,
    N, D, h_b, h_n, s_b, k_b, r_b, o_b, p_b, p_n, SQRT_D,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    n = tl.load(sizes_ptr + b * 3)  # the sample's tokens, rated tokens M, clusters C (host-known)
    m = tl.load(sizes_ptr + b * 3 + 1)
    c = tl.load(sizes_ptr + b * 3 + 2)
    lanes = tl.arange(0, BLOCK_N)
    kept = (tl.load(kept_ptr + b * k_b + lanes, mask=lanes < N, other=0) != 0) & (lanes < n)
    pruned = (lanes < n) & ~kept
    # The M top-rated pruned tokens, best first (ties to the lowest slot).
    rating = tl.load(scores_ptr + b * s_b + lanes, mask=lanes < N, other=0.0).to(tl.float32)
    rating = tl.where(pruned, rating, float("-inf"))
    for t in range(0, m):
        j = tl.argmax(rating, axis=0, tie_break_left=True)
        tl.store(rated_ptr + b * r_b + t, j.to(tl.int32))
        rating = tl.where(lanes == j, float("-inf"), rating)
    tl.debug_barrier()
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < m
    rated = tl.load(rated_ptr + b * r_b + rows, mask=row_ok, other=0).to(tl.int64)
    # Distances ||x_i - x_j|| / sqrt(D) between the rated tokens, one feature at a time.
    acc = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
    for d in range(0, D):
        x = tl.load(hidden_ptr + b * h_b + rated * h_n + d, mask=row_ok, other=0.0).to(tl.float32)
        diff = x[:, None] - x[None, :]
        acc += diff * diff
    pair_ok = row_ok[:, None] & row_ok[None, :]
    dist = tl.where(pair_ok, tl.sqrt(acc) / SQRT_D, float("inf"))
    # Local density from the C nearest (self included).
    work = dist
    near = tl.zeros([BLOCK_M], dtype=tl.float32)
    for _ in range(0, c):
        low = tl.min(work, axis=1)
        near += tl.where(row_ok, low * low, 0.0)
        at = tl.argmin(work, axis=1, tie_break_left=True)
        work = tl.where(rows[None, :] == at[:, None], float("inf"), work)
    density = tl.exp(-near / tl.maximum(c, 1).to(tl.float32))
    largest = tl.max(tl.max(tl.where(pair_ok, dist, float("-inf")), axis=1), axis=0)
    denser = density[None, :] > density[:, None]
    parent = tl.min(tl.where(denser & pair_ok, dist, largest), axis=1)
    rank = tl.where(row_ok, parent * density, float("-inf"))
    # Centres: the C best by parent * density; each token joins its nearest centre.
    best = tl.full([BLOCK_M], float("inf"), dtype=tl.float32)
    assign = tl.zeros([BLOCK_M], dtype=tl.int32)
    centre_of = tl.full([BLOCK_M], -1, dtype=tl.int32)
    for k in range(0, c):
        centre = tl.argmax(rank, axis=0, tie_break_left=True)
        rank = tl.where(rows == centre, float("-inf"), rank)
        centre_of = tl.where(rows == centre, k, centre_of)
        row = tl.min(tl.where(rows[:, None] == centre, dist, float("inf")), axis=0)  # dist[centre, :]
        closer = row < best
        assign = tl.where(closer, k, assign)
        best = tl.where(closer, row, best)
    assign = tl.where(centre_of >= 0, centre_of, assign)
    assign = tl.where(row_ok, assign, -1)
    # Output positions: kept and recycled slots (the last C pruned ones) in slot order.
    n_pruned = tl.sum(pruned.to(tl.int32), axis=0)
    pruned_rank = tl.cumsum(pruned.to(tl.int32), axis=0)  # 1-based among the pruned
    recycled = pruned & (pruned_rank > n_pruned - c)
    taken = kept | recycled
    position = tl.cumsum(taken.to(tl.int32), axis=0) - 1
    tl.store(out_idx_ptr + b * o_b + position, lanes.to(tl.int64), mask=taken)
    cluster_of_slot = pruned_rank - (n_pruned - c) - 1  # cluster k takes the k-th recycled slot
    for d0 in range(0, D, BLOCK_D):
        feats = d0 + tl.arange(0, BLOCK_D)
        f_ok = feats < D
        kept_rows = tl.load(hidden_ptr + b * h_b + lanes[:, None] * h_n + feats[None, :],
                            mask=kept[:, None] & f_ok[None, :], other=0.0)
        tl.store(out_ptr + b * p_b + position[:, None] * p_n + feats[None, :], kept_rows,
                 mask=kept[:, None] & f_ok[None, :])
        x = tl.load(hidden_ptr + b * h_b + rated[:, None] * h_n + feats[None, :],
                    mask=row_ok[:, None] & f_ok[None, :], other=0.0).to(tl.float32)
        for k in range(0, c):
            members = assign == k
            size = tl.sum(members.to(tl.float32), axis=0)
            weight = 1.0 / (size + 1e-6)
            merged = tl.sum(tl.where(members[:, None], x * weight, 0.0), axis=0)  # [BLOCK_D]
            slot_pos = tl.sum(tl.where(recycled & (cluster_of_slot == k), position, 0), axis=0)
            tl.store(out_ptr + b * p_b + slot_pos * p_n + feats, merged.to(out_ptr.dtype.element_ty), mask=f_ok)


def recycle(
    hidden: torch.Tensor, scores: torch.Tensor, kept: list[torch.Tensor] | torch.Tensor, counts: list[int],
    merge: bool = True,
) -> tuple[list[torch.Tensor] | torch.Tensor, list[torch.Tensor] | torch.Tensor]:
    """Kept plus recycled slots and states per sample; see ``reference.recycle``. Returns ``[B, k]``
    and ``[B, k, D]`` tensors when every sample ends with k tokens, lists otherwise."""
    validate_recycle(hidden, scores, kept, counts)
    _check_device(hidden)
    batch, n, dim = hidden.shape
    kept_sizes = [kept.shape[1]] * batch if isinstance(kept, torch.Tensor) else [rows.numel() for rows in kept]
    pruned = [count - size for count, size in zip(counts, kept_sizes, strict=True)]
    rated = [rated_count(p) if merge else 0 for p in pruned]
    clusters = [recycled_count(p) if merge else 0 for p in pruned]
    if max(rated, default=0) > MAX_M:
        raise ValueError(f"{max(rated)} rated tokens is over the kernel's limit of {MAX_M}; "
                         "set PRUNEWARE_KERNELS=reference to use the plain-torch path")
    widths = [size + c for size, c in zip(kept_sizes, clusters, strict=True)]
    width = max(widths, default=0)
    mask = torch.zeros(batch, n, dtype=torch.int8, device=hidden.device)
    if isinstance(kept, torch.Tensor):
        mask.scatter_(1, kept.to(hidden.device), 1)
    else:
        for b, rows in enumerate(kept):
            mask[b, rows.to(hidden.device)] = 1
    sizes = torch.tensor([v for row in zip(counts, rated, clusters, strict=True) for v in row],
                         dtype=torch.int32).to(hidden.device, non_blocking=True)
    scratch = torch.empty(batch, max(max(rated, default=0), 1), dtype=torch.int32, device=hidden.device)
    out_idx = torch.empty(batch, width, dtype=torch.long, device=hidden.device)
    out = torch.empty(batch, width, dim, dtype=hidden.dtype, device=hidden.device)
    if batch and width:
        x, rating = hidden.detach().contiguous(), scores.detach().contiguous()
        _recycle_kernel[(batch,)](
            x, rating, mask, sizes, scratch, out_idx, out, n, dim, x.stride(0), x.stride(1),
            rating.stride(0), mask.stride(0), scratch.stride(0), out_idx.stride(0), out.stride(0), out.stride(1),
            dim**0.5, BLOCK_N=triton.next_power_of_2(n), BLOCK_M=triton.next_power_of_2(max(max(rated), 1)),
            BLOCK_D=min(64, triton.next_power_of_2(dim)),
        )
    if len(set(widths)) == 1:
        return out_idx, out
    return [out_idx[b, :w] for b, w in enumerate(widths)], [out[b, :w] for b, w in enumerate(widths)]


_INTERPRETED = not isinstance(_raters_kernel, triton.runtime.JITFunction)


def _check_device(x: torch.Tensor) -> None:
    if not x.is_cuda and not _INTERPRETED:
        raise ValueError(
            f"the sparsevlm Triton kernels need CUDA tensors, got {x.device}; "
            "use PRUNEWARE_KERNELS=reference or set TRITON_INTERPRET=1 before triton is imported"
        )
