"""Weighted attention scores of chosen query rows against all keys.

Three paths, one result (within float tolerance):
  - ``triton.py``: the fused kernel, for CUDA tensors; no ``B x H x T x L`` tensor is stored;
  - ``cpu.py``: for CPU tensors, the reference's numbers in the fewest torch ops (a scored
    stage at batch 1 is bound by per-op dispatch, see ``pruneware.engine.profiling``);
  - ``reference.py``: the rule in plain torch, the truth the others are tested against.
``PRUNEWARE_KERNELS=reference`` forces the reference and ``=triton`` the kernel (see
:mod:`pruneware.kernels.dispatch`). The Triton module is imported only when used, so
importing this package never needs a GPU or Triton.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..dispatch import choose_backend, forced_backend

__all__ = ["attention_scores"]


def attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
    *,
    query_positions: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_query_block: bool = False,
    per_head_block: bool = False,
    check_positions: bool = True,
    live_rows: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Score every key by the weighted attention that chosen query rows pay it.

    ``s[b, l] = sum_h sum_t weights[b, (h,) t] * softmax_l(q[b, h, t] . k[b, h // g, l] * scale)[l]``

    Args:
        q: ``[B, H, T, d]`` chosen query rows, after RoPE, any float dtype.
        k: ``[B, Hkv, L, d]`` all keys, after RoPE, not repeated for GQA
            (``H % Hkv == 0``; head ``h`` reads key head ``h // (H // Hkv)``).
        weights: ``[B, T]`` float weight per query row (0 ignores the row), or
            ``[B, H, T]``, one weight per query head and row (AdaptInfer's
            per-head text prior); or a callable that makes them from the query
            block (``[B, T, T]``, or ``[B, H, T, T]`` with ``per_head_block``;
            needs query_positions), computed from the same softmax rows.
        query_positions: ``[B, T]`` integer key index of each query row; when
            given, row ``t`` sees only keys ``l <= query_positions[b, t]``.
        key_mask: ``[B, L]`` bool, True for real keys, False for padding.
        scale: logit scale, ``d ** -0.5`` by default.
        return_query_block: also return ``qq`` ``[B, T, T]``, the attention
            among the query rows summed over heads (needs query_positions).
        per_head_block: return that block per head instead, ``[B, H, T, T]``.
        check_positions: check that query_positions lie in ``[0, L)`` (reads them on
            the host: a device sync); False for positions that are slot indices by construction.
        live_rows: the caller promises that every row with a nonzero weight sees at least one
            key (the engine's rows are real tokens, which see themselves); the CPU path then
            skips zeroing rows that see none (their weight, 0, already drops them), one op fewer.
            The scores are the same; a returned block's rows that see no key are then not 0.

    Returns:
        ``(s, qq)``: ``s`` ``[B, L]`` float32, 0 on masked keys; ``qq``
        ``[B, T, T]`` (``[B, H, T, T]`` per head) float32 or None. A row with no allowed key contributes 0.
    """
    from_block = not isinstance(weights, torch.Tensor)
    backend = choose_backend(q, k, None if from_block else weights, query_positions, key_mask)
    if backend != "triton" and q.device.type == "cpu" and forced_backend() != "reference":
        from .cpu import attention_scores as fast

        return fast(q, k, weights, query_positions=query_positions, key_mask=key_mask, scale=scale,
                    return_query_block=return_query_block, per_head_block=per_head_block,
                    check_positions=check_positions, live_rows=live_rows)
    if backend == "triton":
        from .triton import attention_scores as impl
    else:
        from .reference import attention_scores as impl
    if from_block:  # the block first (its weights unused), then the scores with the weights it gives
        _, block = impl(q, k, q.new_zeros(q.shape[0], q.shape[2], dtype=torch.float32), query_positions=query_positions,
                        key_mask=key_mask, scale=scale, return_query_block=True, per_head_block=per_head_block,
                        check_positions=check_positions)
        weights = weights(block)  # type: ignore[operator]
        s, _ = impl(q, k, weights, query_positions=query_positions, key_mask=key_mask, scale=scale,
                    check_positions=False)
        return s, (block if return_query_block else None)
    return impl(q, k, weights, query_positions=query_positions, key_mask=key_mask, scale=scale,
                return_query_block=return_query_block, per_head_block=per_head_block, check_positions=check_positions)
