"""CDPruner's greedy DPP MAP inference in one Triton launch. Same contract as ``reference.py``.

The kernel matrix comes from ``dpp_kernel`` (normalise, one batched matmul on cuBLAS, the
relevance on both sides, in torch), so this kernel and the reference select on the same numbers.
The launch has one program per group (image). It holds the residuals ``d^2`` in registers
(``BLOCK_N`` = N rounded up to a power of two) and writes each step's Cholesky row to a
``[G, k, N]`` scratch buffer: step i reads one row of the kernel matrix and the earlier rows of
its round, so a selection of k tokens costs O(k^2 N) reads in one program, instead of about ten
small launches per kept token. Chosen tokens and padding lanes hold -inf. Ties go to the lowest
index (``tl.argmax`` breaks ties to the left). A barrier after each row is written makes it
visible to every thread before the next step reads single entries of it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import EPS_REL, dpp_kernel, instruction_relevance, validate_inputs, validate_select

MAX_N = 16384  # the residuals live in registers; wider rows would spill badly


@triton.jit
def _greedy_dpp_kernel(
    kernel_ptr, cis_ptr, out_ptr, N, K, s_g, s_r, c_g, c_t, o_g,
    EPS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    base = kernel_ptr + g * s_g
    cbase = cis_ptr + g * c_g
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    diag = tl.load(base + cols.to(tl.int64) * (s_r + 1), mask=col_ok, other=float("-inf"))
    eps = EPS * tl.max(diag, axis=0)
    di2s = diag
    taken = cols >= N  # padding lanes count as taken
    start = 0
    for i in range(0, K):
        j = tl.argmax(di2s, axis=0, tie_break_left=True).to(tl.int32)
        best = tl.max(di2s, axis=0)
        if (best <= eps) & (start < i):  # the chosen tokens span the rest: a new round
            start = i
            di2s = tl.where(taken, float("-inf"), diag)
            j = tl.argmax(di2s, axis=0, tie_break_left=True).to(tl.int32)
            best = tl.max(di2s, axis=0)
        tl.store(out_ptr + g * o_g + i, j.to(tl.int64))
        acc = tl.load(base + j.to(tl.int64) * s_r + cols, mask=col_ok, other=0.0)
        for t in range(start, i):
            c_j = tl.load(cbase + t * c_t + j)
            row = tl.load(cbase + t * c_t + cols, mask=col_ok, other=0.0)
            acc -= c_j * row
        ok = best > eps
        eis = tl.where(ok, acc / tl.sqrt(tl.where(ok, best, 1.0)), 0.0)
        eis = tl.where(col_ok, eis, 0.0)
        tl.store(cbase + i * c_t + cols, eis, mask=col_ok)
        tl.debug_barrier()
        di2s = di2s - eis * eis
        taken = taken | (cols == j)
        di2s = tl.where(taken, float("-inf"), di2s)


_INTERPRETED = not isinstance(_greedy_dpp_kernel, triton.runtime.JITFunction)


def conditional_dpp(x: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    """CDPruner's selection per group. x: [G, N, D] float; relevance: [G, N]; returns sorted
    int64 indices [G, k]."""
    validate_inputs(x, relevance, k)
    if not x.is_cuda and not _INTERPRETED:
        raise ValueError(
            f"conditional_dpp: the Triton backend needs CUDA tensors, got {x.device}; "
            "use PRUNEWARE_KERNELS=reference or set TRITON_INTERPRET=1 before triton is imported"
        )
    g, n, _ = x.shape
    if n > MAX_N:
        raise ValueError(f"N={n} tokens per image is over the kernel's limit of {MAX_N}; "
                         "set PRUNEWARE_KERNELS=reference to use the plain-torch path")
    if k == 0 or g == 0:
        return torch.zeros(g, 0, dtype=torch.long, device=x.device)
    if x.requires_grad:
        x = x.detach()
    kernel = dpp_kernel(x, relevance.detach()).contiguous()  # [G, N, N]
    cis = torch.empty(g, k, n, dtype=torch.float32, device=x.device)  # every row is written before it is read
    out = torch.empty(g, k, dtype=torch.long, device=x.device)
    block_n = triton.next_power_of_2(n)
    warps = 4 if block_n <= 2048 else 8 if block_n <= 8192 else 16
    _greedy_dpp_kernel[(g,)](
        kernel, cis, out, n, k, kernel.stride(0), kernel.stride(1), cis.stride(0), cis.stride(1), out.stride(0),
        EPS=EPS_REL, BLOCK_N=block_n, num_warps=warps,
    )
    return out.sort(dim=1).values


def select(
    x: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor, k: int, sign: str = "positive",
    theta: float | None = None,
) -> torch.Tensor:
    """``reference.select``: the relevance in torch (``reference.instruction_relevance``), then the kernel."""
    validate_select(x, text, text_valid, k, sign)
    valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return conditional_dpp(x, instruction_relevance(x, valid, text, text_valid, sign, theta), k)
