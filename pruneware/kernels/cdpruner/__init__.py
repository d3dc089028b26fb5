"""CDPruner's conditional-DPP selection: ``conditional_dpp``.

Two paths, one result:
  - ``triton.py``: the whole greedy MAP inference in one launch, for CUDA tensors;
  - ``reference.py``: the rule in plain torch, the truth the kernel is tested against (also the
    CPU path: its steps are batched over the groups, a few torch calls each).
``PRUNEWARE_KERNELS=reference`` forces the reference and ``=triton`` the kernel (see
:mod:`pruneware.kernels.dispatch`). The Triton module is imported only when used.
"""

from __future__ import annotations

import torch

from ..dispatch import choose_backend

__all__ = ["conditional_dpp"]


def conditional_dpp(x: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MAP subset of the conditional DPP ``L = diag(r) cos(x, x) diag(r)`` per group.

    Args:
        x: ``[G, N, D]`` float features, G groups (images) of N tokens each.
        relevance: ``[G, N]`` each token's relevance ``r`` (>= 0) to the instruction.
        k: tokens to keep per group, in ``[0, N]``.

    Returns:
        ``[G, k]`` int64 sorted indices into each group's N tokens.

    Raises:
        ValueError: a shape or budget that does not fit, naming the value.
    """
    if choose_backend(x, relevance) == "triton":
        from .triton import conditional_dpp as impl
    else:
        from .reference import conditional_dpp as impl
    return impl(x, relevance, k)
