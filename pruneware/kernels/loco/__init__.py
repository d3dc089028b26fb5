"""PixelPrune's LOCO-I prediction distances for many unit grids at once: ``loco_distances``.

Three paths, one result:
  - ``triton.py``: one launch for every grid, for CUDA tensors;
  - ``cpu.py``: numpy (no torch op), for CPU tensors;
  - ``reference.py``: the rule in plain torch, the truth the others are tested against.
``PRUNEWARE_KERNELS=reference`` forces the reference and ``=triton`` the kernel (see
:mod:`pruneware.kernels.dispatch`). The Triton module is imported only when used.
"""

from __future__ import annotations

import torch

from ..dispatch import choose_backend, forced_backend

__all__ = ["loco_distances"]


def loco_distances(grids: torch.Tensor) -> torch.Tensor:
    """Each unit's L-inf distance to its LOCO-I prediction from its left, upper and upper-left
    neighbours (see ``reference.py``).

    Args:
        grids: ``[n, h, w, D]`` float, n unit grids (a unit: its D pixel values or features).

    Returns:
        ``[n, h, w]`` float32, inf at each grid's top-left unit.

    Raises:
        ValueError: a shape or dtype that does not fit, naming the value.
    """
    if choose_backend(grids) == "triton":
        from .triton import loco_distances as impl
    elif grids.device.type == "cpu" and forced_backend() != "reference":
        from .cpu import loco_distances as impl
    else:
        from .reference import loco_distances as impl
    return impl(grids)
