"""VisionZip's merge on CPU tensors: the reference's torch calls where they round (the top-k,
the key norms, the two matrix products), numpy for the rest (gathers, sorts, the argmax, the
means), so the result is the reference's bit for bit in four torch ops instead of forty.
Arrays cross by DLPack (`pruneware.kernels.host`). Keys other than float32 and bfloat16 states,
which numpy cannot hold, go through the reference.
"""

from __future__ import annotations

import numpy as np
import torch

from ..host import as_numpy, as_tensor
from . import reference
from .reference import split, validate_inputs


def take_rows(x: np.ndarray, index: np.ndarray) -> np.ndarray:
    """x [B, n, ...] rows at index [B, m] -> [B, m, ...] (a contiguous copy)."""
    return np.take_along_axis(x, index.reshape(*index.shape, *([1] * (x.ndim - 2))), axis=1)


def batched_merge(
    hidden: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, budget: int, share: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.batched_merge`` on CPU tensors: kept slots [B, budget] and states [B, budget, D]."""
    validate_inputs(hidden, scores, keys, budget, share)
    if hidden.device.type != "cpu":
        raise ValueError(f"the numpy path takes CPU tensors, got {hidden.device}")
    if keys.dtype != torch.float32 or hidden.dtype not in (torch.float32, torch.float16):
        return reference.batched_merge(hidden, scores, keys, budget, share)
    batch, n, _ = hidden.shape
    n_dominant = split(budget, share)
    count, m = budget - n_dominant, n - n_dominant
    dominant = np.zeros((batch, n), dtype=np.int8)
    np.put_along_axis(dominant, as_numpy(scores.topk(n_dominant, dim=1).indices), 1, axis=1)
    order = np.argsort(dominant, axis=1, kind="stable")  # the others in order, then the dominant
    states_in = as_numpy(hidden)
    if count == 0:
        slots = np.ascontiguousarray(order[:, m:])
        return as_tensor(slots), as_tensor(take_rows(states_in, slots))
    rest = order[:, as_numpy(reference.rest_order(m, count, torch.device("cpu")))]  # targets, then the others
    gathered = as_tensor(take_rows(as_numpy(keys), rest))  # [B, m, d]
    unit = as_numpy(gathered) / as_numpy(gathered.norm(dim=-1, keepdim=True))  # [B, m, d]
    # Operands sliced and transposed in numpy (contiguous copies: no torch op each), multiplied by
    # torch as the reference multiplies them (the same products, bit for bit; tested).
    similarity = torch.matmul(as_tensor(unit[:, count:]), as_tensor(unit[:, :count].transpose(0, 2, 1)))
    assign = as_numpy(similarity).argmax(axis=2)  # [B, m - c]
    one_hot = np.zeros((batch, count, m - count), dtype=np.float32)  # the reference's one-hot, transposed
    np.put_along_axis(one_hot, assign[:, None, :], 1.0, axis=1)
    targets = take_rows(states_in, rest[:, :count]).astype(np.float32, copy=False)  # [B, c, D]
    members = take_rows(states_in, rest[:, count:]).astype(np.float32, copy=False)  # [B, m - c, D], contiguous
    summed = as_numpy(torch.matmul(as_tensor(one_hot), as_tensor(members)))
    merged = summed / np.maximum(one_hot.sum(axis=2), np.float32(1))[..., None]
    contextual = (targets + merged).astype(states_in.dtype)
    chosen = np.concatenate([order[:, m:], rest[:, :count]], axis=1)
    by_slot = np.argsort(chosen, axis=1, kind="stable")
    states = np.concatenate([take_rows(states_in, order[:, m:]), contextual], axis=1)
    return as_tensor(np.take_along_axis(chosen, by_slot, axis=1)), as_tensor(take_rows(states, by_slot))
