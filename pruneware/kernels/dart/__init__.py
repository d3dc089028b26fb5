"""DART's duplication-aware selection (``select``, ``duplication_aware``) and its pivot scores
(``key_norms`` of keys that ``rotate_back`` first rotates to the positions a padded sample has alone).

Three paths; the selection is one result bit for bit (they share the pivots and the similarity
matrix, ``reference.prepare``, and differ only in the greedy loop), and so are the CPU path's
rotation and norms (the reference's float32 operations, in its order and memory layout):
  - ``triton.py``: the loop, the rotation and the norms in one launch each, for CUDA tensors
    (their rotation and norms round in float32, within per-dtype tolerances of the reference);
  - ``cpu.py``: numpy, for CPU tensors (a torch call per step costs more than the step);
  - ``reference.py``: the rule in plain torch, the truth the others are tested against.
``PRUNEWARE_KERNELS=reference`` forces the reference and ``=triton`` the kernel (see
:mod:`pruneware.kernels.dispatch`). The Triton module is imported only when used.
"""

from __future__ import annotations

import torch

from ..dispatch import choose_backend, forced_backend

__all__ = ["duplication_aware", "key_norms", "rotate_back", "select"]


def _backend(*tensors: torch.Tensor) -> str:
    if choose_backend(*tensors) == "triton":
        return "triton"
    return "cpu" if tensors[0].device.type == "cpu" and forced_backend() != "reference" else "reference"


def rotate_back(key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Each sample's post-RoPE keys rotated back by a shift of its positions (DART reads key norms
    as a sample alone has them: ``pruneware.engine.key_positions``).

    Args:
        key: ``[B, H, L, d]`` float post-RoPE keys.
        cos, sin: ``[B, 2, d]`` the model's RoPE tables (attention scaling included) at each
            sample's shift (row 0) and at position 0 (row 1: the scaling alone).

    Returns:
        ``[B, H, L, d]`` in key's dtype: ``k * c - rotate_half(k) * s``, c and s the row-0 tables
        over the scaling (transformers' rotation by minus the shift).

    Raises:
        ValueError: a shape that does not fit, naming the value.
    """
    backend = _backend(key, cos, sin)
    if backend == "triton":
        from .triton import rotate_back as impl
    elif backend == "cpu":
        from .cpu import rotate_back as impl
    else:
        from .reference import rotate_back as impl
    return impl(key, cos, sin)


def key_norms(key: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` float32: the L1 norm of each key ``[B, H, L, d]`` over every head and channel
    (DART's pivot score), summed in float32. Raises ValueError for a shape that does not fit."""
    backend = _backend(key)
    if backend == "triton":
        from .triton import key_norms as impl
    elif backend == "cpu":
        from .cpu import key_norms as impl
    else:
        from .reference import key_norms as impl
    return impl(key)


def select(
    visual: torch.Tensor, norms: torch.Tensor, text_hidden: torch.Tensor, text_valid: torch.Tensor,
    text_norms: torch.Tensor, k: int, pivot_image: int, pivot_text: int,
) -> torch.Tensor:
    """DART's kept tokens of G images, from the text rows: the text pivots (the `pivot_text` valid
    rows with the largest key L1 norm, in position order), then ``duplication_aware``, in one call.

    Args:
        visual, norms, k, pivot_image: as for ``duplication_aware``.
        text_hidden: ``[G, T, D]`` float normed states of each group's text rows (left-aligned).
        text_valid: ``[G, T]`` bool, the real rows.
        text_norms: ``[G, T]`` their key L1 norms.
        pivot_text: text pivots per group (fewer when a group has fewer valid rows).

    Returns:
        ``[G, k]`` int64 sorted indices into each image's n tokens.

    Raises:
        ValueError: a shape or budget that does not fit, naming the value.
    """
    if choose_backend(visual, norms, text_hidden, text_valid) == "triton":
        from .triton import select as impl
    elif visual.device.type == "cpu" and forced_backend() != "reference":
        from .cpu import select as impl
    else:
        from .reference import select as impl
    return impl(visual, norms, text_hidden, text_valid, text_norms, k, pivot_image, pivot_text)


def duplication_aware(
    visual: torch.Tensor, norms: torch.Tensor, text_pivots: torch.Tensor, text_valid: torch.Tensor, k: int,
    pivot_image: int,
) -> torch.Tensor:
    """DART's kept tokens of G images (one image per row) at once.

    Args:
        visual: ``[G, n, D]`` float normed states of each image's tokens.
        norms: ``[G, n]`` their key L1 norms (the image pivots are the largest).
        text_pivots: ``[G, p, D]`` the text pivots' normed states, in position order.
        text_valid: ``[G, p]`` bool, the text pivots that count (fewer text rows, fewer pivots).
        k: tokens to keep per image, in ``[0, n]``.
        pivot_image: image pivots per image (``min(pivot_image, k)`` are taken).

    Returns:
        ``[G, k]`` int64 sorted indices into each image's n tokens.

    Raises:
        ValueError: a shape or budget that does not fit, naming the value.
    """
    if choose_backend(visual, norms, text_pivots, text_valid) == "triton":
        from .triton import duplication_aware as impl
    elif visual.device.type == "cpu" and forced_backend() != "reference":
        from .cpu import duplication_aware as impl
    else:
        from .reference import duplication_aware as impl
    return impl(visual, norms, text_pivots, text_valid, k, pivot_image)
