"""CDPruner's greedy DPP MAP on CPU tensors, with the k dependent steps run in numpy.

Same contract and the same rule as ``reference.py``, on the same float32 kernel matrix
(``dpp_kernel``). What changes is the cost of a step: each is a handful of tiny dependent
operations on ``[N]`` rows, where each torch call costs microseconds of dispatch (and the
reference's batched round check a host sync) and numpy's a fraction of that. The Cholesky rows
are summed in a different order than the reference's ``einsum``, so residuals can differ in the
last bits; the tests check that the kept sets are identical.
"""

from __future__ import annotations

import numpy as np
import torch

from ..host import as_numpy, as_tensor
from .reference import EPS_REL, dpp_kernel, validate_inputs, validate_select


def greedy_map_one(kernel: np.ndarray, k: int) -> np.ndarray:
    """Greedy MAP of one group's DPP, kernel [N, N] float32; int64 picks [k] in pick order."""
    n = kernel.shape[0]
    diag = np.diagonal(kernel).copy()
    eps = np.float32(EPS_REL) * diag.max()
    cis = np.zeros((k, n), dtype=np.float32)
    di2s = diag.copy()
    taken = np.zeros(n, dtype=bool)
    picks = np.empty(k, dtype=np.int64)
    start = 0
    for i in range(k):
        j = int(di2s.argmax())
        if di2s[j] <= eps and start < i:  # the chosen tokens span the rest: a new round
            start = i
            di2s = np.where(taken, np.float32(-np.inf), diag)
            j = int(di2s.argmax())
        picks[i] = j
        residual = di2s[j]
        if residual > eps:
            eis = (kernel[j] - cis[start:i, j] @ cis[start:i]) / np.sqrt(residual)
        else:
            eis = np.zeros(n, dtype=np.float32)
        cis[i] = eis
        di2s = di2s - eis * eis
        taken[j] = True
        di2s[j] = -np.inf
    return picks


def conditional_dpp(x: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    """CDPruner's selection per group on CPU. x: [G, N, D] float; relevance: [G, N]; returns
    sorted int64 indices [G, k]."""
    validate_inputs(x, relevance, k)
    if x.device.type != "cpu":
        raise ValueError(f"the numpy path takes CPU tensors, got {x.device}")
    g = x.shape[0]
    if k == 0 or g == 0:
        return torch.zeros(g, 0, dtype=torch.long)
    kernel = as_numpy(dpp_kernel(x, relevance))  # [G, N, N] float32 (as_numpy detaches)
    chosen = np.stack([greedy_map_one(kernel[i], k) for i in range(g)])
    chosen.sort(axis=1)
    return as_tensor(chosen)


def select(
    x: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor, k: int, sign: str = "positive",
    theta: float | None = None,
) -> torch.Tensor:
    """``reference.select`` on CPU tensors: relevance, kernel matrix and greedy MAP in one call.

    The reductions (the two norms, the two matrix products, the sum over text rows, ``exp``) are
    the reference's torch calls on the same values, and the elementwise steps (divisions, the
    min-max normalisation, the relevance on both sides) numpy's, which round as torch does: the
    kernel matrix is the reference's bit for bit, in seven torch ops instead of about thirty.
    """
    validate_select(x, text, text_valid, k, sign)
    if x.device.type != "cpu":
        raise ValueError(f"the numpy path takes CPU tensors, got {x.device}")
    g = x.shape[0]
    if k == 0 or g == 0:
        return torch.zeros(g, 0, dtype=torch.long)
    kernel = conditional_kernel(x, text, text_valid, sign, theta)
    chosen = np.stack([greedy_map_one(kernel[i], k) for i in range(g)])
    chosen.sort(axis=1)
    return as_tensor(chosen)


def conditional_kernel(
    x: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor, sign: str, theta: float | None,
) -> np.ndarray:
    """[G, N, N] float32: ``dpp_kernel(x, instruction_relevance(x, all valid, text, ...))``, bit for bit."""
    xf = x if x.dtype == torch.float32 else x.float()
    features, norms = as_numpy(xf), as_numpy(xf.norm(dim=-1, keepdim=True))  # [G, N, D], [G, N, 1]
    if sign == "none":
        raw = np.ones(features.shape[:2], dtype=np.float32)
    else:
        tf = text if text.dtype == torch.float32 else text.float()
        ok = as_numpy(text_valid)
        unit_t = as_numpy(tf) / np.maximum(as_numpy(tf.norm(dim=-1, keepdim=True)), np.float32(1e-12)) * ok[..., None]
        unit_v = as_tensor(features / np.maximum(norms, np.float32(1e-12)))
        sums = as_numpy(torch.matmul(unit_v, as_tensor(unit_t).transpose(1, 2)).sum(dim=2))  # [G, N]
        raw = sums / np.maximum(ok.sum(axis=1), 1).astype(np.float32)[:, None]
        if sign == "negative":
            raw = -raw
    low, high = raw.min(axis=1, keepdims=True), raw.max(axis=1, keepdims=True)
    span = np.where(high > low, high - low, np.float32(1.0))
    rel = (raw - low + np.float32(1e-6)) / span
    if theta is not None:
        rel = as_numpy(torch.exp(as_tensor(np.float32(theta / (2 * (1 - theta))) * rel)))
    unit = as_tensor(features / np.maximum(norms, np.float32(1e-30)))
    similarity = as_numpy(torch.matmul(unit, unit.transpose(1, 2)))  # [G, N, N]
    return rel[:, :, None] * similarity * rel[:, None, :]
