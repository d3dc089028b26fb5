"""Weighted attention scores of chosen query rows against all keys.

``attention_scores`` runs the fused Triton kernel on CUDA tensors and the
plain-torch reference elsewhere; ``PRUNEWARE_KERNELS=reference|triton``
overrides the choice (see :mod:`pruneware.kernels.dispatch`). The Triton
module is imported only when used, so importing this package never needs a
GPU or Triton.
"""

from __future__ import annotations

import torch

from ..dispatch import choose_backend

__all__ = ["attention_scores"]


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Score every key by the weighted attention that chosen query rows pay it.

    ``s[b, l] = sum_h sum_t weights[b, (h,) t] * softmax_l(q[b, h, t] . k[b, h // g, l] * scale)[l]``

    Args:
        q: ``[B, H, T, d]`` chosen query rows, after RoPE, any float dtype.
        k: ``[B, Hkv, L, d]`` all keys, after RoPE, not repeated for GQA
            (``H % Hkv == 0``; head ``h`` reads key head ``h // (H // Hkv)``).
        weights: ``[B, T]`` float weight per query row (0 ignores the row), or
            ``[B, H, T]``, one weight per query head and row (AdaptInfer's
            per-head text prior).
        query_positions: ``[B, T]`` integer key index of each query row; when
            given, row ``t`` sees only keys ``l <= query_positions[b, t]``.
        key_mask: ``[B, L]`` bool, True for real keys, False for padding.
        scale: logit scale, ``d ** -0.5`` by default.
        return_query_block: also return ``qq`` ``[B, T, T]``, the attention
            among the query rows summed over heads (needs query_positions).
        per_head_block: return that block per head instead, ``[B, H, T, T]``.

    Returns:
        ``(s, qq)``: ``s`` ``[B, L]`` float32, 0 on masked keys; ``qq``
        ``[B, T, T]`` (``[B, H, T, T]`` per head) float32 or None. A row with no allowed key contributes 0.
    """
    if choose_backend(q, k, weights, query_positions, key_mask) == "triton":
        from .triton import attention_scores as impl
    else:
        from .reference import attention_scores as impl
    return impl(
        q,
        k,
        weights,
        query_positions=query_positions,
        key_mask=key_mask,
        scale=scale,
        return_query_block=return_query_block,
        per_head_block=per_head_block,
    )
