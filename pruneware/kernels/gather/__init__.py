"""Gather every sequence-laid-out tensor that shares a keep index, in one launch.

``gather_rows`` runs the Triton kernel on CUDA tensors and the plain-torch reference
elsewhere; ``PRUNEWARE_KERNELS=reference|triton`` overrides the choice (see
:mod:`pruneware.kernels.dispatch`). The Triton module is imported only when used, so
importing this package never needs a GPU or Triton.
"""

from __future__ import annotations

import torch

from ..dispatch import choose_backend

__all__ = ["gather_rows"]


def gather_rows(
    index: torch.Tensor, *tensors: torch.Tensor, positions: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """Keep rows ``index[b]`` of every tensor, sample by sample: ``out[..., b, j] = x[..., b, index[b, j]]``.

    Args:
        index: ``[B, k]`` int64 (or int32) kept positions in ``[0, L)``, per sample.
        tensors: each ``[B, L, W]`` or ``[B, L]`` (hidden states, cos, sin, a 2-D mask),
            gathered along dim 1; a batch-1 table (``[1, L, W]``) is broadcast to all samples.
        positions: position ids ``[B, L]`` or M-RoPE ``[3, B, L]`` / ``[4, B, L]``, gathered
            along the last dim; batch-1 planes broadcast too.

    Returns:
        The gathered tensors in argument order, ``positions`` last: ``[B, k, W]``, ``[B, k]``
        or ``[G, B, k]``; same dtype and device as the inputs, contiguous.

    Raises:
        ValueError: a shape, dtype or device that does not fit, naming the argument.
    """
    if choose_backend(index, *tensors, positions) == "triton":
        from .triton import gather_rows as impl
    else:
        from .reference import gather_rows as impl
    return impl(index, *tensors, positions=positions)
