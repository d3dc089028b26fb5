"""DivPrune's greedy max-min diverse selection: ``max_min_diverse``.

Three paths, one result, bit for bit:
  - ``triton.py``: the whole greedy selection in one launch, for CUDA tensors;
  - ``cpu.py``: the k dependent steps in numpy, for CPU tensors (a torch call per step costs
    more than the step's work);
  - ``reference.py``: the rule in plain torch, the truth the others are tested against.
``PRUNEWARE_KERNELS=reference`` forces the reference and ``=triton`` the kernel (see
:mod:`pruneware.kernels.dispatch`). The Triton module is imported only when used.
"""

from __future__ import annotations

import torch

from ..dispatch import choose_backend, forced_backend

__all__ = ["max_min_diverse"]


def max_min_diverse(x: torch.Tensor, k: int, spatial: float = 0.0, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Greedy max-min subset of each group's rows by cosine distance.

    Args:
        x: ``[G, N, D]`` float features, G groups (images) of N tokens each.
        k: tokens to keep per group, in ``[0, N]``.
        spatial: weight of the optional grid-distance term (``reference.py``); 0, the default,
            is the official rule.
        grid: ``(h, w)`` with ``h * w == N``, the tokens' grid (row-major); needed when spatial > 0.

    Returns:
        ``[G, k]`` int64 sorted indices into each group's N tokens.

    Raises:
        ValueError: a shape or budget that does not fit, naming the value.
    """
    if choose_backend(x) == "triton":
        from .triton import max_min_diverse as impl
    elif x.device.type == "cpu" and forced_backend() != "reference":
        from .cpu import max_min_diverse as impl
    else:
        from .reference import max_min_diverse as impl
    if spatial:
        return impl(x, k, spatial, grid)
    return impl(x, k)
