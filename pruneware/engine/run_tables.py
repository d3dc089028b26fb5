"""Index tables of a level whose samples each hold their visual tokens in one run of slots.

In a left-padded batch with one image per prompt, sample b's visual slots are the run
start_b..start_b+n_b-1, and the starts differ from sample to sample (`Level.visual_starts`).
Everything the engine would otherwise sort or gather to find those slots depends only on the
starts, the counts and the lengths, which the layout knows on the host: so these tables are
built with numpy and handed to torch by DLPack (no torch op; on a GPU one small host-to-device
copy each), once per layout and shape, and shared by every forward that has them (never written).
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch

from pruneware.kernels.host import as_tensor


def _on(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """array on `device`: shared memory on the CPU; elsewhere one copy that does not wait for the
    device (from pageable memory it is staged at once, so the array may go away after)."""
    tensor = as_tensor(array)
    return tensor if device.type == "cpu" else tensor.to(device, non_blocking=True)


def _cached(fn):
    """lru_cache keyed also by the inference mode, so that a table made under
    `torch.inference_mode` never reaches autograd (as `levels.identity_tensors`)."""
    cached = lru_cache(maxsize=64)(lambda inference, *args: fn(*args))

    def call(*args):
        return cached(torch.is_inference_mode_enabled(), *args)

    call.__doc__ = fn.__doc__
    return call


@_cached
def run_starts(starts: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[B, 1] long: each sample's first visual slot (add a [B, k] index into the run to get slots)."""
    return _on(np.asarray(starts, dtype=np.int64)[:, None], device)


@_cached
def run_slots(starts: tuple[int, ...], n: int, device: torch.device) -> torch.Tensor:
    """[B, n] long: start_b + j, the slot of each sample's j-th visual token (n each)."""
    return _on(np.asarray(starts, dtype=np.int64)[:, None] + np.arange(n, dtype=np.int64), device)


@_cached
def run_order(starts: tuple[int, ...], counts: tuple[int, ...], length: int, device: torch.device) -> torch.Tensor:
    """[B, L] long: each sample's slots with its visual run first, then the others, each in slot order
    (`Level.visual_first`)."""
    order = np.empty((len(starts), length), dtype=np.int64)
    slots = np.arange(length, dtype=np.int64)
    for b, (start, n) in enumerate(zip(starts, counts, strict=True)):
        order[b] = np.concatenate([slots[start:start + n], slots[:start], slots[start + n:]])
    return _on(order, device)


class RunCut(NamedTuple):
    """How to cut a level whose runs hold n slots each down to k kept ones (see `run_cut`)."""

    text: torch.Tensor  # [B, L - n + k] long: the parent slot of each new text slot (the run's entries are overwritten)
    columns: torch.Tensor  # [B, k] long: the new slots of the kept run, start_b + j
    image_ids: torch.Tensor  # [B, L - n + k] long: 0 on the kept run, -1 elsewhere (one image per sample)


@_cached
def run_cut(starts: tuple[int, ...], length: int, n: int, k: int, device: torch.device) -> RunCut:
    """The tables that cut a parent of `length` slots, whose sample b has its n visual slots at
    start_b.., to a level keeping k of them: new slot j of sample b is parent slot j before the
    run, the kept run's slots at start_b..start_b+k-1 (scattered into `columns`), and j + n - k after it."""
    new = length - n + k
    slots = np.arange(new, dtype=np.int64)
    begin = np.asarray(starts, dtype=np.int64)[:, None]
    after = slots[None] >= begin + k
    text = np.where(after, slots[None] + (n - k), slots[None])
    columns = begin + np.arange(k, dtype=np.int64)
    image_ids = np.where((slots[None] >= begin) & ~after, 0, -1).astype(np.int64)
    return RunCut(_on(text, device), _on(columns, device), _on(image_ids, device))


@_cached
def post_image_rows(ends: tuple[int, ...], length: int, device: torch.device) -> torch.Tensor:
    """[B, L - min(ends)] bool: which of the slots min(ends)..L-1 lie after sample b's visual run
    (its run ends before slot ends[b])."""
    first = min(ends)
    slots = np.arange(first, length, dtype=np.int64)
    return _on(slots[None] >= np.asarray(ends, dtype=np.int64)[:, None], device)


@_cached
def slot_run(batch: int, first: int, length: int, device: torch.device) -> torch.Tensor:
    """[B, L - first] long: the slots first..L-1 in every sample (query rows that are one run)."""
    return _on(np.broadcast_to(np.arange(first, length, dtype=np.int64), (batch, length - first)), device)
