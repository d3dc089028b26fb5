"""SparseVLM's raters and recycling on CPU tensors in numpy: same contract and rule as ``reference.py``.

Both are short chains of small per-sample steps (masks, a softmax, a [M, M] distance matrix,
a few top-k, an index-add), where each torch call costs microseconds of dispatch and the
reference's per-sample ``any()`` a host sync; in numpy the chain costs no torch op at all
(tensors cross by DLPack, ``pruneware.kernels.host``).
Matrix products and sums run in numpy's order, so values can differ from the reference in the
last bits; the tests check that the raters and the kept and recycled slots are identical and the
merged states close. The rating's top-k breaks ties to the lowest index (``kind="stable"``); the
cluster centres are ranked by torch's top-k (one op), whose order of exact ties (structural
here: see ``cluster_and_merge``) fixes which slot each merged token takes.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from ..host import as_numpy, as_tensor
from ..scores.reference import validate_inputs as validate_scores
from .reference import rated_count, recycled_count, validate_raters, validate_recycle


def text_raters(embeds: torch.Tensor, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """[B, L] bool raters; see ``reference.text_raters``. CPU tensors only."""
    validate_raters(embeds, visual, text)
    x, vis, txt = as_numpy(embeds, float32=True), as_numpy(visual), as_numpy(text)
    out = np.zeros(txt.shape, dtype=bool)
    for b in range(x.shape[0]):
        if not vis[b].any() or not txt[b].any():
            continue
        logits = x[b, vis[b]] @ x[b, txt[b]].T  # [Nv, Nt]
        weights = np.exp(logits - logits.max(axis=1, keepdims=True))
        relevance = (weights / weights.sum(axis=1, keepdims=True)).mean(axis=0)  # [Nt]
        out[b, np.flatnonzero(txt[b])] = relevance > relevance.mean()
    return as_tensor(out)


def distances(rows: list[np.ndarray]) -> list[np.ndarray]:
    """Per x [M, D] float32: its distances ||x_i - x_j|| / sqrt(D) [M, M], by the reference's
    ``torch.cdist`` without the matmul shortcut (one call for all when every M agrees): the
    reference's numbers, at C speed (a numpy difference tensor costs M times the memory traffic)."""
    mode = "donot_use_mm_for_euclid_dist"
    if len({len(x) for x in rows}) == 1:
        stacked = as_tensor(np.stack(rows))
        dist = list(as_numpy(torch.cdist(stacked, stacked, compute_mode=mode)))
    else:
        dist = [as_numpy(torch.cdist(t, t, compute_mode=mode)) for t in map(as_tensor, rows)]
    return [d / np.float32(x.shape[1] ** 0.5) for d, x in zip(dist, rows, strict=True)]


def cluster_and_merge(x: np.ndarray, clusters: int, dist: np.ndarray | None = None) -> np.ndarray:
    """[clusters, D] float32: ``reference.cluster_and_merge`` of x [M, D] float32 (dist: its
    ``distances``, when the caller computed them for several samples at once)."""
    m, d = x.shape
    dist = distances([x])[0] if dist is None else dist
    nearest = np.partition(dist, clusters - 1, axis=1)[:, :clusters] if clusters < m else dist
    density = np.exp(-(nearest * nearest).mean(axis=1, dtype=np.float32))  # [M]
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    parent = np.where(denser, dist, dist.max()).min(axis=1)
    # torch's top-k, for its order of exact ties: two tokens that are each other's nearest have
    # the same density, and when no token is denser both take dist.max() as parent.
    centres = as_numpy(as_tensor(parent * density).topk(clusters).indices)
    assign = dist[centres].argmin(axis=0)  # [M] nearest centre (the first on ties)
    assign[centres] = np.arange(clusters)
    sizes = np.bincount(assign, minlength=clusters).astype(np.float32)
    weights = np.float32(1.0) / (sizes + np.float32(1e-6))  # official: token_weight / (all_weight + 1e-6)
    merged = np.zeros((clusters, d), dtype=np.float32)
    for row, cluster in zip(x * weights[assign, None], assign, strict=True):  # index_add_'s order, row by row
        merged[cluster] += row  # (np.add.at is element by element: ten times slower here)
    return merged


def recycle(
    hidden: torch.Tensor, scores: torch.Tensor, kept: list[torch.Tensor] | torch.Tensor, counts: list[int],
    merge: bool = True,
) -> tuple[list[torch.Tensor] | torch.Tensor, list[torch.Tensor] | torch.Tensor]:
    """Kept plus recycled slots and states per sample; see ``reference.recycle``. CPU tensors only.

    Returns one ``[B, k]`` / ``[B, k, D]`` pair of tensors when every sample ends with k tokens
    (a ``[B, k]`` ``kept`` is taken as is), lists otherwise.
    """
    validate_recycle(hidden, scores, kept, counts)
    states_in = as_numpy(hidden) if hidden.dtype != torch.bfloat16 else None
    wide = as_numpy(hidden, float32=True)
    rating = as_numpy(scores, float32=True)
    kept_np = as_numpy(kept) if isinstance(kept, torch.Tensor) else [as_numpy(rows) for rows in kept]
    pruned_of, rated_of = [], {}
    for b, n in enumerate(counts):
        pruned_mask = np.ones(n, dtype=bool)
        pruned_mask[kept_np[b]] = False
        pruned_of.append(np.flatnonzero(pruned_mask))  # slot order
        if merge and len(pruned_of[b]):
            order = np.argsort(-rating[b, pruned_of[b]], kind="stable")[: rated_count(len(pruned_of[b]))]
            rated_of[b] = wide[b, pruned_of[b][order]]  # [M, D], the best rated first
    dist_of = dict(zip(rated_of, distances(list(rated_of.values())), strict=True)) if rated_of else {}
    slots_out, states_out = [], []
    for b, pruned in enumerate(pruned_of):
        slots = pruned[:0]
        merged = None
        if b in rated_of:
            merged = cluster_and_merge(rated_of[b], recycled_count(len(pruned)), dist_of[b])
            slots = pruned[len(pruned) - len(merged):]
        index = np.sort(np.concatenate([kept_np[b], slots]))
        if states_in is not None:
            states = states_in[b, index]  # a copy
            if merged is not None:
                states[np.searchsorted(index, slots)] = merged.astype(states.dtype)
            states_out.append(states)
        else:  # bfloat16 has no numpy dtype: write the merged rows in torch
            states = hidden[b, as_tensor(index)]
            if merged is not None:
                states[as_tensor(np.searchsorted(index, slots))] = as_tensor(merged).to(states.dtype)
            states_out.append(states)
        slots_out.append(index)
    if len({len(s) for s in slots_out}) == 1 and slots_out:
        stacked = torch.stack(states_out) if isinstance(states_out[0], torch.Tensor) else as_tensor(
            np.stack(states_out))
        return as_tensor(np.stack(slots_out)), stacked
    states_t = [s if isinstance(s, torch.Tensor) else as_tensor(s) for s in states_out]
    return [as_tensor(s) for s in slots_out], states_t


@lru_cache(maxsize=64)
def _causal(first: int, length: int, inference: bool) -> torch.Tensor:
    """[T, L] bool: row t, at slot first + t, sees slots <= first + t (made once per shape and
    inference mode, never written)."""
    return as_tensor(np.arange(length)[None, :] <= np.arange(first, length)[:, None])


def rater_scores(
    q: torch.Tensor, k: torch.Tensor, raters: torch.Tensor, run: slice, key_mask: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """``reference.rater_scores`` on CPU tensors in the ops of ``kernels.scores.cpu`` (one einsum for
    the logits, one softmax, one for the sum), with the rows' causal mask a table made once per shape
    (the rows are one run of slots): the same numbers in three ops fewer."""
    B, H, T, d = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    scale = validate_scores(q, k, None, None, key_mask, scale, False, False, False)
    if run.start is None or run.start + T != L:
        raise ValueError(f"run must be the rows' slots {L - T}..{L - 1}, got {run}")
    qf, kf = (x if x.dtype == torch.float32 else x.float() for x in (q, k))
    if Hkv == H:
        logits, heads = torch.einsum("bhtd,bhld->bhtl", qf, kf), (1,)
    else:
        logits, heads = torch.einsum("bkgtd,bkld->bkgtl", qf.reshape(B, Hkv, H // Hkv, T, d), kf), (1, 1)
    allowed = _causal(run.start, L, torch.is_inference_mode_enabled())  # [T, L]
    if key_mask is not None:
        allowed = allowed & key_mask.reshape(B, *heads, 1, L)
    # Rows are real tokens, which see themselves: the lowest float for -inf, as the score kernel's live rows.
    probs = torch.softmax(torch.where(allowed, logits.mul_(scale), torch.finfo(logits.dtype).min), dim=-1)
    w = raters.float()
    return torch.einsum("bhtl,bt->bl" if Hkv == H else "bkgtl,bt->bl", probs, w)
