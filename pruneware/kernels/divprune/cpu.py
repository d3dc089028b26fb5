"""DivPrune's greedy selection on CPU tensors, with the k dependent steps run in numpy.

Same contract and same result as ``reference.py``, bit for bit: both select on ``1 -`` the
matrix ``cosine_similarity`` computes, and every later step only compares, takes minimums and
picks the first maximum (``numpy.argmax`` breaks ties to the lowest index, as ``torch.argmax``
does). What changes is the cost of a step: the greedy loop is k tiny dependent operations on
``[G, N]`` rows, where each torch call costs microseconds of dispatch and numpy's cost a
fraction of that. Chosen tokens are marked by -inf in the running minimum, which a minimum
never raises, instead of by a separate mask.

It also never builds the whole distance matrix. ``fl(1 - s)`` is monotone in ``s``, so the
first pick's nearest-neighbour distances are ``fl(1 - max_j s_ij)``, exactly the minimum of the
reference's distances; the argmax is then taken over those distances, so ties created by the
rounding of ``1 - s`` break as in the reference. Each step turns one similarity row into
distances, k rows in all instead of N.
"""

from __future__ import annotations

import numpy as np
import torch

from .reference import cosine_similarity, validate_inputs


def max_min_diverse(x: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min diverse subset. x: [G, N, D] float on CPU; returns sorted int64 indices [G, k]."""
    validate_inputs(x, k)
    if x.device.type != "cpu":
        raise ValueError(f"the numpy path takes CPU tensors, got {x.device}")
    g, n, _ = x.shape
    if k == 0:
        return torch.zeros(g, 0, dtype=torch.long)
    one = np.float32(1.0)
    if x.requires_grad:  # vLLM's embed path runs with grad enabled; a selection needs none
        x = x.detach()
    sim = cosine_similarity(x).numpy()  # [G, N, N], owned here
    diag = np.arange(n)
    sim[:, diag, diag] = -np.inf  # a token is not its own nearest neighbour
    chosen = np.empty((g, k), dtype=np.int64)
    rows = np.arange(g)
    chosen[:, 0] = first = (one - sim.max(axis=2)).argmax(axis=1)
    nearest = one - sim[rows, first]  # [G, N] distance to the chosen set
    nearest[rows, first] = -np.inf
    if g == 1:  # the common case: plain 1-D steps, no fancy indexing
        row, table, out = nearest[0], sim[0], chosen[0]
        step = np.empty(n, dtype=np.float32)
        for i in range(1, k):
            pick = row.argmax()
            out[i] = pick
            np.subtract(one, table[pick], out=step)
            np.minimum(row, step, out=row)
            row[pick] = -np.inf
    else:
        for i in range(1, k):
            pick = nearest.argmax(axis=1)
            chosen[:, i] = pick
            np.minimum(nearest, one - sim[rows, pick], out=nearest)
            nearest[rows, pick] = -np.inf
    chosen.sort(axis=1)
    return torch.from_numpy(chosen)
