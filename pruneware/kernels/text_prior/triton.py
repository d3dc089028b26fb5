"""AdaptInfer's text prior fused in Triton. Same contract as ``reference.py``.

``text_prior``: one program per (sample, head, block of rows i) sweeps the ``[T, T]`` block among
the query rows in tiles, summing column i and row i over the valid rows in one pass, and writes
``V_i (colsum_i + rowsum_i - B_ii)``: one launch where the torch rule takes eight.
``text_prior_scores``: the shared score kernel gives the per-head block (``pruneware.kernels.scores``,
``return_query_block``), this kernel its prior, and the score kernel the weighted sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..scores import triton as scores_triton
from .reference import validate_block


@triton.jit
def _prior_kernel(
    block_ptr, valid_ptr, out_ptr, H, T, sb_b, sb_h, sb_t, sb_u, sv_b, so_b, so_h,
    BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    ok_i = offs_i < T
    base = block_ptr + b * sb_b + h * sb_h
    v_i = tl.load(valid_ptr + b * sv_b + offs_i, mask=ok_i, other=0).to(tl.float32)
    total = tl.zeros([BLOCK_I], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        ok_t = offs_t < T
        v_t = tl.load(valid_ptr + b * sv_b + offs_t, mask=ok_t, other=0).to(tl.float32)
        ok = ok_i[:, None] & ok_t[None, :]
        column = tl.load(base + offs_t[None, :] * sb_t + offs_i[:, None] * sb_u, mask=ok, other=0.0).to(tl.float32)
        row = tl.load(base + offs_i[:, None] * sb_t + offs_t[None, :] * sb_u, mask=ok, other=0.0).to(tl.float32)
        total += tl.sum((column + row) * v_t[None, :], axis=1)
    diag = tl.load(base + offs_i * sb_t + offs_i * sb_u, mask=ok_i, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * so_b + h * so_h + offs_i, v_i * (total - v_i * diag), mask=ok_i)


_INTERPRETED = not isinstance(_prior_kernel, triton.runtime.JITFunction)


def text_prior(block: torch.Tensor, row_valid: torch.Tensor) -> torch.Tensor:
    """:func:`pruneware.kernels.text_prior.reference.text_prior` in one launch: ``[B, H, T]`` float32."""
    validate_block(block, row_valid)
    if not block.is_cuda and not _INTERPRETED:
        raise ValueError("text_prior: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 set before triton "
                         "is imported); PRUNEWARE_KERNELS=reference runs the plain-torch rule anywhere")
    B, H, T, _ = block.shape
    out = torch.empty(B, H, T, dtype=torch.float32, device=block.device)
    if T == 0 or B == 0 or H == 0:
        return out
    valid = row_valid.contiguous()
    block_i = min(max(triton.next_power_of_2(T), 16), 64)
    _prior_kernel[(B * H, triton.cdiv(T, block_i))](
        block, valid, out, H, T, *block.stride(), valid.stride(0), out.stride(0), out.stride(1),
        BLOCK_I=block_i, BLOCK_T=64,
    )
    return out


def text_prior_scores(
    q: torch.Tensor, k: torch.Tensor, query_positions: torch.Tensor, row_valid: torch.Tensor, *,
    key_mask: torch.Tensor | None = None, scale: float | None = None, query_run: slice | None = None,
) -> torch.Tensor:
    """:func:`pruneware.kernels.text_prior.reference.text_prior_scores` with the score kernel and the prior kernel."""
    zeros = torch.zeros(q.shape[0], q.shape[2], dtype=torch.float32, device=q.device)
    _, block = scores_triton.attention_scores(
        q, k, zeros, query_positions=query_positions, key_mask=key_mask, scale=scale, return_query_block=True,
        per_head_block=True, check_positions=False,
    )
    prior = text_prior(block, row_valid)  # type: ignore[arg-type]
    return scores_triton.attention_scores(q, k, prior, query_positions=query_positions, key_mask=key_mask,
                                          scale=scale, check_positions=False)[0]
