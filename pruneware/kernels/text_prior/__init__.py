"""AdaptInfer's text-prior scoring: ``text_prior`` (the per-head prior of each query row, from the
attention among the rows) and ``text_prior_scores`` (every key's attention weighted by it).

Three paths, one result (within float tolerance):
  - ``triton.py``: the prior in one launch, between two calls of the shared score kernel;
  - ``cpu.py``: for CPU tensors, one softmax and the prior contracted with it in two ``einsum``
    calls (a scored stage at batch 1 is bound by per-op dispatch, see ``pruneware.engine.profiling``);
  - ``reference.py``: the rule in plain torch, the truth the others are tested against.
``PRUNEWARE_KERNELS=reference`` forces the reference and ``=triton`` the kernel (see
:mod:`pruneware.kernels.dispatch`). The Triton module is imported only when used.
"""

from __future__ import annotations

import torch

from ..dispatch import choose_backend, forced_backend

__all__ = ["text_prior", "text_prior_scores"]


def text_prior(block: torch.Tensor, row_valid: torch.Tensor) -> torch.Tensor:
    """AdaptInfer's per-head prior: ``[B, H, T]`` float32 ``V_i (sum_t V_t B_ti + sum_u V_u B_iu - B_ii)``.

    Args:
        block: ``[B, H, T, T]`` the attention among the query rows per head (``block[b, h, t, u]``:
            the probability row t gives row u's key).
        row_valid: ``[B, T]`` bool, the rows that count.

    Raises:
        ValueError: a shape, dtype or device that does not fit, naming the argument.
    """
    if choose_backend(block, row_valid) == "triton":
        from .triton import text_prior as impl
    else:
        from .reference import text_prior as impl
    return impl(block, row_valid)


def text_prior_scores(
    q: torch.Tensor, k: torch.Tensor, query_positions: torch.Tensor, row_valid: torch.Tensor, *,
    key_mask: torch.Tensor | None = None, scale: float | None = None, query_run: slice | None = None,
) -> torch.Tensor:
    """``s[b, l] = sum_h sum_i prior[b, h, i] * softmax_l(q[b, h, i] . k[b, h // g, l] * scale)``, ``[B, L]`` float32.

    Args:
        q: ``[B, H, T, d]`` the query rows after RoPE; k: ``[B, Hkv, L, d]`` every key after RoPE,
            not repeated for grouped-query attention.
        query_positions: ``[B, T]`` integer key index of each row (row t sees keys <= it).
        row_valid: ``[B, T]`` bool, the rows that count (a row that sees no key contributes 0).
        key_mask: ``[B, L]`` bool, True for real keys (None: all real).
        scale: logit scale, ``d ** -0.5`` by default.
        query_run: when known on the host, the rows' positions as one slice shared by every sample
            ending at the last key (the CPU path then slices the block instead of gathering it).

    Raises:
        ValueError: a shape, dtype or device that does not fit, naming the argument.
    """
    backend = choose_backend(q, k, query_positions, row_valid, key_mask)
    if backend == "triton":
        from .triton import text_prior_scores as impl
    elif q.device.type == "cpu" and forced_backend() != "reference":
        from .cpu import text_prior_scores as impl
    else:
        from .reference import text_prior_scores as impl
    return impl(q, k, query_positions, row_valid, key_mask=key_mask, scale=scale, query_run=query_run)
