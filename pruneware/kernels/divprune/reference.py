"""DivPrune's greedy max-min selection in plain torch: the truth the fast paths must equal.

This is the rule of the official code (vbdi/divprune, `llava_arch.py`, `DivPrune`): on the
cosine distance ``1 - cos`` of the features, the first token is the one farthest from its
nearest other token, and each next token maximises its distance to the nearest token already
chosen. Ties go to the lowest index, as ``torch.argmax`` does.
"""

from __future__ import annotations

import torch


def validate_inputs(x: torch.Tensor, k: int) -> None:
    """Raise ValueError for a shape or budget the selection cannot take, naming the bad value."""
    if x.dim() != 3:
        raise ValueError(f"x must be [G, N, D], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a float tensor, got {x.dtype}")
    n = x.shape[1]
    if not 0 <= k <= n:
        raise ValueError(f"k={k} is outside [0, N={n}]")


def cosine_similarity(x: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between every pair of rows, in float32. x: [G, N, D] -> [G, N, N].

    Every backend selects on ``1 - `` this same matrix, so their selections agree exactly.
    """
    x = x if x.dtype == torch.float32 else x.float()
    # `normalize`'s arithmetic (x / max(||x||, eps)) without its expand: one op fewer, the same numbers.
    unit = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)
    return unit @ unit.transpose(1, 2)


def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` between every pair of rows, in float32. x: [G, N, D] -> [G, N, N]."""
    return 1.0 - cosine_similarity(x)


def max_min_diverse(x: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min diverse subset. x: [G, N, D] float; returns sorted int64 indices [G, k]."""
    validate_inputs(x, k)
    g, n, _ = x.shape
    if k == 0:
        return torch.zeros(g, 0, dtype=torch.long, device=x.device)
    dist = cosine_distance(x)  # [G, N, N]
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    first = dist.masked_fill(eye, float("inf")).min(dim=2).values.argmax(dim=1)  # [G]
    chosen = torch.empty(g, k, dtype=torch.long, device=x.device)
    chosen[:, 0] = first
    rows = torch.arange(g, device=x.device)
    nearest = dist[rows, first]  # [G, N] distance to the chosen set
    taken = torch.zeros(g, n, dtype=torch.bool, device=x.device)
    taken[rows, first] = True
    for i in range(1, k):
        pick = nearest.masked_fill(taken, float("-inf")).argmax(dim=1)
        chosen[:, i] = pick
        taken[rows, pick] = True
        nearest = torch.minimum(nearest, dist[rows, pick])
    return chosen.sort(dim=1).values
