"""VisionZip's merge in one Triton launch, one program per image. Same contract as ``reference.py``.

A program holds its image's n lanes (``BLOCK_N`` = n rounded up to a power of two): the dominant
tokens (the top scores, by repeated argmax), the rank of every other token among the others, the
strided targets, each other token's target by cosine similarity of keys (dot products over
``BLOCK_K`` key features at a time, divided by both norms; the first target on ties, as torch's
argmax), and the output: kept slots in slot order, dominant states copied, contextual states as
the target's state plus the mean of its members, ``BLOCK_D`` features at a time. Ties among
scores go to the lowest slot (torch's top-k order is unspecified). Cosines are computed from dot
products and norms, not from unit vectors, so a near-tie can pick another target than the
reference's; the tests compare on inputs without near-ties.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import split, validate_inputs

MAX_N = 16384  # lanes held in registers per image


@triton.jit
def _visionzip_kernel(
    hidden_ptr, scores_ptr, keys_ptr, slots_ptr, out_ptr,
    N, D, DK, N_DOMINANT, COUNT, STEP, h_b, h_n, s_b, k_b, k_n, o_b, p_b, p_n,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_N)
    real = lanes < N
    rating = tl.load(scores_ptr + b * s_b + lanes, mask=real, other=float("-inf")).to(tl.float32)
    dominant = lanes < 0
    for _ in range(0, N_DOMINANT):
        j = tl.argmax(rating, axis=0, tie_break_left=True)
        dominant = dominant | (lanes == j)
        rating = tl.where(lanes == j, float("-inf"), rating)
    other = real & ~dominant
    rank = tl.cumsum(other.to(tl.int32), axis=0) - 1  # among the others, in slot order
    target = other & (rank % STEP == 0) & (rank < COUNT * STEP)
    target_id = tl.where(target, rank // STEP, -1)
    merging = other & ~target
    # Key norms of every lane, then each merging token's most similar target.
    sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, DK, BLOCK_K):
        feats = k0 + tl.arange(0, BLOCK_K)
        kx = tl.load(keys_ptr + b * k_b + lanes[:, None] * k_n + feats[None, :],
                     mask=real[:, None] & (feats < DK)[None, :], other=0.0).to(tl.float32)
        sq += tl.sum(kx * kx, axis=1)
    norm = tl.sqrt(sq)
    best = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    assign = tl.full([BLOCK_N], -1, dtype=tl.int32)
    for t in range(0, COUNT):
        lane_t = tl.sum(tl.where(target_id == t, lanes, 0), axis=0)
        norm_t = tl.sum(tl.where(lanes == lane_t, norm, 0.0), axis=0)
        dot = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, DK, BLOCK_K):
            feats = k0 + tl.arange(0, BLOCK_K)
            f_ok = feats < DK
            kt = tl.load(keys_ptr + b * k_b + lane_t * k_n + feats, mask=f_ok, other=0.0).to(tl.float32)
            kx = tl.load(keys_ptr + b * k_b + lanes[:, None] * k_n + feats[None, :],
                         mask=merging[:, None] & f_ok[None, :], other=0.0).to(tl.float32)
            dot += tl.sum(kx * kt[None, :], axis=1)
        cosine = dot / tl.where(merging, norm * norm_t, 1.0)
        better = merging & (cosine > best)
        assign = tl.where(better, t, assign)
        best = tl.where(better, cosine, best)
    # Output: dominant and target slots in slot order.
    kept = dominant | target
    position = tl.cumsum(kept.to(tl.int32), axis=0) - 1
    tl.store(slots_ptr + b * o_b + position, lanes.to(tl.int64), mask=kept)
    for d0 in range(0, D, BLOCK_D):
        feats = d0 + tl.arange(0, BLOCK_D)
        f_ok = feats < D
        rows = tl.load(hidden_ptr + b * h_b + lanes[:, None] * h_n + feats[None, :],
                       mask=real[:, None] & f_ok[None, :], other=0.0)
        tl.store(out_ptr + b * p_b + position[:, None] * p_n + feats[None, :], rows,
                 mask=dominant[:, None] & f_ok[None, :])
        wide = rows.to(tl.float32)
        for t in range(0, COUNT):
            members = assign == t
            size = tl.maximum(tl.sum(members.to(tl.float32), axis=0), 1.0)
            mean = tl.sum(tl.where(members[:, None], wide, 0.0), axis=0) / size
            own = tl.sum(tl.where((target_id == t)[:, None], wide, 0.0), axis=0)
            at = tl.sum(tl.where(target_id == t, position, 0), axis=0)
            tl.store(out_ptr + b * p_b + at * p_n + feats, (own + mean).to(out_ptr.dtype.element_ty), mask=f_ok)


_INTERPRETED = not isinstance(_visionzip_kernel, triton.runtime.JITFunction)


def batched_merge(
    hidden: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, budget: int, share: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.batched_merge`` in one launch: kept slots [B, budget] and states [B, budget, D]."""
    validate_inputs(hidden, scores, keys, budget, share)
    if not hidden.is_cuda and not _INTERPRETED:
        raise ValueError(
            f"batched_merge: the Triton backend needs CUDA tensors, got {hidden.device}; "
            "use PRUNEWARE_KERNELS=reference or set TRITON_INTERPRET=1 before triton is imported"
        )
    batch, n, dim = hidden.shape
    if n > MAX_N:
        raise ValueError(f"n={n} tokens per image is over the kernel's limit of {MAX_N}; "
                         "set PRUNEWARE_KERNELS=reference to use the plain-torch path")
    n_dominant = split(budget, share)
    count, m = budget - n_dominant, n - n_dominant
    x, rating, k = hidden.detach().contiguous(), scores.detach().contiguous(), keys.detach().contiguous()
    slots = torch.empty(batch, budget, dtype=torch.long, device=hidden.device)
    out = torch.empty(batch, budget, dim, dtype=hidden.dtype, device=hidden.device)
    if batch:
        _visionzip_kernel[(batch,)](
            x, rating, k, slots, out, n, dim, k.shape[2], n_dominant, count, max(1, m // max(count, 1)),
            x.stride(0), x.stride(1), rating.stride(0), k.stride(0), k.stride(1), slots.stride(0),
            out.stride(0), out.stride(1),
            BLOCK_N=triton.next_power_of_2(n), BLOCK_D=32, BLOCK_K=32, num_warps=8,
        )
    return slots, out
