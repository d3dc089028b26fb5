"""DivPrune's greedy selection on CPU tensors, with the k dependent steps run in numpy.

Same contract and same result as ``reference.py``, bit for bit: both select on ``1 -`` the
matrix ``cosine_similarity`` computes, and every later step only compares, takes minimums and
picks the first maximum (``numpy.argmax`` breaks ties to the lowest index, as ``torch.argmax``
does). What changes is the cost of a step: the greedy loop is k tiny dependent operations on
``[G, N]`` rows, where each torch call costs microseconds of dispatch and numpy's cost a
fraction of that.

The similarity matrix becomes the distance matrix ``fl(1 - s)`` in place, in one pass (no new
N x N buffer). Its diagonal first holds +inf, so that each row's minimum is the token's
distance to its nearest other token (the first pick), then -inf: the running minimum of a
chosen token then takes -inf from the chosen token's own row, which a minimum never raises, so
each later step is just an argmax and a minimum, with no separate mark of the chosen tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from ..host import as_numpy, as_tensor
from .reference import cosine_similarity, spatial_term, validate_inputs, validate_spatial


def max_min_diverse(x: torch.Tensor, k: int, spatial: float = 0.0, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Greedy max-min diverse subset. x: [G, N, D] float on CPU; returns sorted int64 indices [G, k].
    spatial, grid: the optional grid-distance term (``reference.py``), added as the reference adds it."""
    validate_inputs(x, k)
    if x.device.type != "cpu":
        raise ValueError(f"the numpy path takes CPU tensors, got {x.device}")
    g, n, _ = x.shape
    validate_spatial(n, spatial, grid)
    if k == 0:
        return torch.zeros(g, 0, dtype=torch.long)
    if x.requires_grad:  # vLLM's embed path runs with grad enabled; a selection needs none
        x = x.detach()
    dist = as_numpy(cosine_similarity(x))  # [G, N, N], owned here: turned into distances in place
    np.subtract(np.float32(1.0), dist, out=dist)
    if spatial:  # the same float32 [N, N] term the reference adds, broadcast over the groups
        np.add(dist, as_numpy(spatial_term(spatial, grid)), out=dist)  # type: ignore[arg-type]
    diag = np.arange(n)
    dist[:, diag, diag] = np.inf  # a token is not its own nearest neighbour
    first = dist.min(axis=2).argmax(axis=1)  # [G]: the token farthest from its nearest neighbour
    dist[:, diag, diag] = -np.inf  # from here on, a chosen token's own entry marks it taken
    if g == 1:  # the common case: plain 1-D steps, no fancy indexing
        table = dist[0]
        row = table[first[0]].copy()  # [N] distance to the chosen set
        picks = [int(first[0])]
        append, argmax, minimum = picks.append, row.argmax, np.minimum
        for _ in range(k - 1):
            pick = argmax()
            append(pick)
            minimum(row, table[pick], out=row)
        chosen = np.array(picks, dtype=np.int64)[None]
    else:
        rows = np.arange(g)
        chosen = np.empty((g, k), dtype=np.int64)
        chosen[:, 0] = first
        nearest = dist[rows, first]  # [G, N] distance to the chosen set
        for i in range(1, k):
            pick = nearest.argmax(axis=1)
            chosen[:, i] = pick
            np.minimum(nearest, dist[rows, pick], out=nearest)
    chosen.sort(axis=1)
    return as_tensor(chosen)
