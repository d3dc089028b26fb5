"""PyramidDrop's layer-K preview: ``preview_scores``, the last row's attention over every key of a
Llama-style layer, computed from the layer's input, norm, q/k projections and RoPE rows.

Three paths, one result (within per-dtype tolerance):
  - ``triton.py``: three fused launches, for CUDA tensors; no q or k of the whole sequence is stored;
  - ``cpu.py``: for CPU float32 tensors, the reference's numbers in the fewest torch ops (a scored
    stage at batch 1 is bound by per-op dispatch, see ``pruneware.engine.profiling``);
  - ``reference.py``: the rule in plain torch, the truth the others are tested against.
``PRUNEWARE_KERNELS=reference`` forces the reference and ``=triton`` the kernel (see
:mod:`pruneware.kernels.dispatch`). The Triton module is imported only when used.
"""

from __future__ import annotations

import torch

from ..dispatch import choose_backend, forced_backend

__all__ = ["preview_scores"]


def preview_scores(
    hidden: torch.Tensor, norm_weight: torch.Tensor, eps: float, wq: torch.Tensor, bq: torch.Tensor | None,
    wk: torch.Tensor, bk: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
    *, key_mask: torch.Tensor | None = None, weights: torch.Tensor | None = None, scale: float | None = None,
) -> torch.Tensor:
    """The last row's softmax attention over every key, summed over heads, of a Llama-style layer.

    Args:
        hidden: ``[B, L, D]`` the layer's input; the query is row ``L - 1`` of each sample.
        norm_weight, eps: the input RMSNorm's weight ``[D]`` and epsilon.
        wq, bq: ``[H * d, D]`` query projection and ``[H * d]`` bias (or None).
        wk, bk: ``[Hkv * d, D]`` key projection and ``[Hkv * d]`` bias (or None).
        cos, sin: ``[B|1, L, d]`` the layer's rotate-half RoPE rows.
        heads, kv_heads: query and key heads (``heads % kv_heads == 0``, grouped-query attention).
        key_mask: ``[B, L]`` bool, True for real keys (None: all real).
        weights: ``[B, 1]`` float, the query row's weight (None: 1).
        scale: logit scale, ``d ** -0.5`` by default.

    Returns:
        ``[B, L]`` float32 ``weights[b] * sum_h softmax_l(q_h . k_l * scale)``, 0 on masked keys.

    Raises:
        ValueError: a shape, dtype or device that does not fit, naming the argument.
    """
    args = (hidden, norm_weight, eps, wq, bq, wk, bk, cos, sin, heads, kv_heads)
    backend = choose_backend(hidden, norm_weight, wq, bq, wk, bk, cos, sin, key_mask, weights)
    if backend == "triton":
        from .triton import preview_scores as impl
    elif hidden.device.type == "cpu" and forced_backend() != "reference":
        from .cpu import preview_scores as impl
    else:
        from .reference import preview_scores as impl
    return impl(*args, key_mask=key_mask, weights=weights, scale=scale)
