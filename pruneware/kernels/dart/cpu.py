"""DART's greedy loop, key norms and padded keys' rotation on CPU tensors in numpy: same contract
and result as ``reference.py``.

The pivots and the similarity matrix are the reference's (``reference.prepare``, or from ``select``
the same top-k and ``cosine_similarity`` with the text pivots and the gathers in numpy: three torch
ops for the whole batch; arrays cross by DLPack, ``pruneware.kernels.host``); the loop (per image,
per pivot: the least similar free tokens) is many tiny dependent steps, cheaper in numpy than one
torch dispatch each. ``numpy.argsort(kind="stable")`` breaks ties to the lowest index, as the
reference's stable sort does. The rotation is the reference's elementwise float32 steps (no torch
op) and the norms its sum (one op), in the key's memory layout: the same numbers.
"""

from __future__ import annotations

import numpy as np
import torch

from ..host import as_numpy, as_tensor
from . import reference
from .reference import prepare, shares, text_pivots, validate_inputs, validate_keys, validate_text


def top_rows(scores: np.ndarray, count: int) -> np.ndarray:
    """[G, count] int64: the rows of each group's `count` largest scores [G, T], in position order.
    The top-k is torch's (one op), so that ties pick the rows the reference picks."""
    return np.sort(as_numpy(as_tensor(scores).topk(count, dim=1).indices), axis=1)


def prepare_numpy(
    visual: torch.Tensor, norms: torch.Tensor, text_pivots: np.ndarray, text_valid: np.ndarray, k: int,
    pivot_image: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``reference.prepare`` with the gathers in numpy: the pivots are picked by torch's top-k and
    compared by torch's ``cosine_similarity`` on the same values (bit for bit the reference's)."""
    p_img = min(pivot_image, k)
    x = as_numpy(visual)
    image_pivots = top_rows(as_numpy(norms), p_img)  # [G, p_img]
    chosen = np.take_along_axis(x, image_pivots[..., None], axis=1)  # [G, p_img, D]
    pivots = np.concatenate([chosen, text_pivots.astype(x.dtype, copy=False)], axis=1)  # [G, P, D]
    # The broadcast axes are numpy views, shared by DLPack: the one torch op is the similarity.
    similarity = torch.nn.functional.cosine_similarity(
        as_tensor(pivots[:, :, None]), as_tensor(x[:, None]), dim=-1)  # [G, P, n]
    valid = np.pad(text_valid, ((0, 0), (p_img, 0)), constant_values=True)  # [G, P]
    return image_pivots, as_numpy(similarity, float32=True), valid


def select(
    visual: torch.Tensor, norms: torch.Tensor, text_hidden: torch.Tensor, text_valid: torch.Tensor,
    text_norms: torch.Tensor, k: int, pivot_image: int, pivot_text: int,
) -> torch.Tensor:
    """DART from the text rows; see ``reference.select``. CPU tensors only; the text pivots and the
    gathers in numpy (a bfloat16 input, which numpy cannot hold, goes through ``prepare``)."""
    validate_text(visual, text_hidden, text_valid, text_norms, pivot_text)
    if visual.dtype == torch.bfloat16 or text_hidden.dtype == torch.bfloat16:
        return duplication_aware(visual, norms, *text_pivots(text_hidden, text_valid, text_norms, pivot_text), k,
                                 pivot_image)
    ok = as_numpy(text_valid)
    rows = top_rows(np.where(ok, as_numpy(text_norms, float32=True), np.float32(-np.inf)),
                    min(pivot_text, ok.shape[1]))  # [G, p]
    pivots = np.take_along_axis(as_numpy(text_hidden), rows[..., None], axis=1)  # [G, p, D]
    return duplication_aware(visual, norms, pivots, np.take_along_axis(ok, rows, axis=1), k, pivot_image)


def duplication_aware(
    visual: torch.Tensor, norms: torch.Tensor, text_pivots: torch.Tensor | np.ndarray,
    text_valid: torch.Tensor | np.ndarray, k: int, pivot_image: int,
) -> torch.Tensor:
    """DART's kept tokens of G images; see ``reference.duplication_aware``. CPU tensors only (the
    text pivots may come as numpy arrays, from ``select``)."""
    if visual.device.type != "cpu":
        raise ValueError(f"the numpy path takes CPU tensors, got {visual.device}")
    numpy_text = isinstance(text_pivots, np.ndarray)
    validate_inputs(visual, norms, as_tensor(text_pivots) if numpy_text else text_pivots,
                    as_tensor(text_valid) if numpy_text else text_valid, k, pivot_image)
    g, n, _ = visual.shape
    if k >= n:
        return torch.arange(n).expand(g, n).clone()
    if numpy_text:
        pivots_img, sim, ok = prepare_numpy(visual, norms, text_pivots, text_valid, k, pivot_image)
    else:
        image_pivots, similarity, valid = prepare(visual, norms, text_pivots, text_valid, k, pivot_image)
        sim = as_numpy(similarity, float32=True)  # exact: a widening
        ok, pivots_img = as_numpy(valid), as_numpy(image_pivots)
    p_img = pivots_img.shape[1]
    key_norms = None
    out = np.empty((g, k), dtype=np.int64)
    for b in range(g):
        free = np.ones(n, dtype=bool)
        free[pivots_img[b]] = False
        turns = np.flatnonzero(ok[b])
        share, extra = shares(k, p_img, len(turns))
        kept = [pivots_img[b]]
        if not len(turns):  # no pivot at all: the largest key norms (ties to the lowest index)
            key_norms = as_numpy(norms, float32=True) if key_norms is None else key_norms
            kept.append(np.argsort(-key_norms[b], kind="stable")[: k - p_img])
        for turn, i in enumerate(turns):
            take = min(share + (turn < extra), int(free.sum()))
            if take == 0:
                continue
            candidates = np.flatnonzero(free)
            picked = candidates[np.argsort(sim[b, i, candidates], kind="stable")[:take]]
            free[picked] = False
            kept.append(picked)
        out[b] = np.sort(np.concatenate(kept))
    return as_tensor(out)


def rotate_back(key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``reference.rotate_back`` in numpy (float32 keys and tables; others take the reference):
    the same elementwise float32 operations in the same order, so the same numbers, and no torch op."""
    validate_keys(key, cos, sin)
    if key.device.type != "cpu" or not key.dtype == cos.dtype == sin.dtype == torch.float32:
        return reference.rotate_back(key, cos, sin)
    k, cos_np, sin_np = as_numpy(key), as_numpy(cos), as_numpy(sin)
    scale = cos_np[:, 1:]  # [B, 1, d]
    c, s = (cos_np[:, :1] / scale)[:, None], (sin_np[:, :1] / scale)[:, None]  # [B, 1, 1, d]
    half = k.shape[-1] // 2
    rotated = np.concatenate([-k[..., half:], k[..., :half]], axis=-1)
    out = np.empty_like(k)  # key's memory layout, as torch gives the reference's result
    return torch.from_dlpack(np.subtract(k * c, rotated * s, out=out))


def key_norms(key: torch.Tensor) -> torch.Tensor:
    """``reference.key_norms``: the absolute values in numpy, in key's memory layout (as torch
    lays out the reference's), summed by torch: one op, the reference's reduction, the same
    numbers. Float32 CPU keys; others take the reference."""
    validate_keys(key)
    if key.device.type != "cpu" or key.dtype != torch.float32:
        return reference.key_norms(key)
    return torch.from_dlpack(np.abs(as_numpy(key))).sum(dim=(1, 3))  # strides kept: the same summation order
