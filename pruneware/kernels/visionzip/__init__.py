"""VisionZip's dominant and contextual tokens for every image at once: ``batched_merge``.

Three paths, one result:
  - ``triton.py``: one launch for the batch (one program per image), for CUDA tensors;
  - ``cpu.py``: numpy around the reference's rounding torch calls, for CPU tensors;
  - ``reference.py``: the rule in plain torch, the truth the others are tested against.
``PRUNEWARE_KERNELS=reference`` forces the reference and ``=triton`` the kernel (see
:mod:`pruneware.kernels.dispatch`). The Triton module is imported only when used.
"""

from __future__ import annotations

import torch

from ..dispatch import choose_backend, forced_backend

__all__ = ["batched_merge"]


def batched_merge(
    hidden: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, budget: int, share: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip on B images of n tokens each (one image per row).

    Args:
        hidden: ``[B, n, D]`` float, the tokens' states.
        scores: ``[B, n]`` float, their [CLS]-attention scores (the dominant are the top).
        keys: ``[B, n, d]`` float, their keys (contextual tokens merge by key cosine similarity).
        budget: tokens kept per image, in ``(0, n)``.
        share: the dominant share of the budget, in ``(0, 1]``.

    Returns:
        the kept slots ``[B, budget]`` int64 (sorted) and their states ``[B, budget, D]``: a
        dominant token keeps its state, a contextual one takes its target's slot.

    Raises:
        ValueError: a shape, budget or share that does not fit, naming the value.
    """
    if choose_backend(hidden, scores, keys) == "triton":
        from .triton import batched_merge as impl
    elif hidden.device.type == "cpu" and forced_backend() != "reference":
        from .cpu import batched_merge as impl
    else:
        from .reference import batched_merge as impl
    return impl(hidden, scores, keys, budget, float(share))
