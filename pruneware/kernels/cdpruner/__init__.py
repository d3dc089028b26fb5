"""CDPruner's conditional-DPP selection: ``conditional_dpp``.

Three paths, one result:
  - ``triton.py``: the whole greedy MAP inference in one launch, for CUDA tensors;
  - ``cpu.py``: the k dependent steps in numpy, for CPU tensors (a torch call per step costs
    more than the step's work);
  - ``reference.py``: the rule in plain torch, the truth the others are tested against.
``PRUNEWARE_KERNELS=reference`` forces the reference and ``=triton`` the kernel (see
:mod:`pruneware.kernels.dispatch`). The Triton module is imported only when used.
"""

from __future__ import annotations

import torch

from ..dispatch import choose_backend, forced_backend
from .reference import RELEVANCE, instruction_relevance

__all__ = ["RELEVANCE", "conditional_dpp", "instruction_relevance", "select"]


def select(
    x: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor, k: int, sign: str = "positive",
    theta: float | None = None,
) -> torch.Tensor:
    """CDPruner on G groups whose tokens are all valid, in one call: the instruction relevance
    (``instruction_relevance``), the kernel matrix and its greedy MAP (``conditional_dpp``).

    Args:
        x: ``[G, N, D]`` float features, G groups (images) of N tokens each.
        text: ``[G, T, D]`` float, each group's instruction rows (left-aligned).
        text_valid: ``[G, T]`` bool, the real rows.
        k: tokens to keep per group, in ``[0, N]``.
        sign, theta: the relevance's sign (one of ``RELEVANCE``) and optional exponent.

    Returns:
        ``[G, k]`` int64 sorted indices into each group's N tokens.

    Raises:
        ValueError: a shape, budget or sign that does not fit, naming the value.
    """
    if choose_backend(x, text, text_valid) == "triton":
        from .triton import select as impl
    elif x.device.type == "cpu" and forced_backend() != "reference":
        from .cpu import select as impl
    else:
        from .reference import select as impl
    return impl(x, text, text_valid, k, sign, theta)


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
    elif x.device.type == "cpu" and forced_backend() != "reference":
        from .cpu import conditional_dpp as impl
    else:
        from .reference import conditional_dpp as impl
    return impl(x, relevance, k)
