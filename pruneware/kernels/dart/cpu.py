"""DART's greedy loop on CPU tensors in numpy: same contract and result as ``reference.py``.

The pivots and the similarity matrix come from ``reference.prepare`` (torch, a few ops for the
whole batch); the loop (per image, per pivot: the least similar free tokens) is many tiny
dependent steps, cheaper in numpy than one torch dispatch each. ``numpy.argsort(kind="stable")`` breaks ties to the
lowest index, as the reference's stable sort does.
"""

from __future__ import annotations

import numpy as np
import torch

from .reference import prepare, shares, validate_inputs


def duplication_aware(
    visual: torch.Tensor, norms: torch.Tensor, text_pivots: torch.Tensor, text_valid: torch.Tensor, k: int,
    pivot_image: int,
) -> torch.Tensor:
    """DART's kept tokens of G images; see ``reference.duplication_aware``. CPU tensors only."""
    validate_inputs(visual, norms, text_pivots, text_valid, k, pivot_image)
    if visual.device.type != "cpu":
        raise ValueError(f"the numpy path takes CPU tensors, got {visual.device}")
    g, n, _ = visual.shape
    if k >= n:
        return torch.arange(n).expand(g, n).clone()
    image_pivots, similarity, valid = prepare(visual, norms, text_pivots, text_valid, k, pivot_image)
    p_img = image_pivots.shape[1]
    sim = (similarity if similarity.dtype == torch.float32 else similarity.float()).numpy()  # exact: a widening
    ok, pivots_img = valid.numpy(), image_pivots.numpy()
    key_norms = None
    out = np.empty((g, k), dtype=np.int64)
    for b in range(g):
        free = np.ones(n, dtype=bool)
        free[pivots_img[b]] = False
        turns = np.flatnonzero(ok[b])
        share, extra = shares(k, p_img, len(turns))
        kept = [pivots_img[b]]
        if not len(turns):  # no pivot at all: the largest key norms (ties to the lowest index)
            key_norms = norms.float().numpy() if key_norms is None else key_norms
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
    return torch.from_numpy(out)
