"""Slicing the attention masks that the model loop builds for the full sequence.

Three formats reach a decoder layer, depending on the backend's mask function:
  - 4-D bool [B, 1, Q, K] (sdpa; True = attend), or None for a plain causal mask;
  - 4-D float [B, 1, Q, K] (eager; 0 or the dtype's minimum);
  - 2-D [B, K] padding mask (flash attention), or None when nothing is padded.
A pruned level keeps some rows and columns, and may add invalid (padding) slots when
samples keep different numbers of tokens; those columns are masked out, and an invalid row
attends only to itself so that no row is empty (an empty softmax row gives NaN).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import torch

MaskKind = Literal["bool", "float", "2d"]


def mask_kind(attn_implementation: str) -> MaskKind:
    """The mask format a backend's mask function produces."""
    if "flash" in attn_implementation:
        return "2d"
    if attn_implementation.endswith("eager"):
        return "float"
    return "bool"


def _gather_last(m: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """m: [B|1, ..., K]; cols: [B, n] -> [B, ..., n].

    One `take_along_dim`, which broadcasts the index over the middle dims and a batch-1 mask
    over the samples (a view, an expand and a gather would be three ops, each a dispatch)."""
    if m.dim() == 2:
        return torch.take_along_dim(m, cols, dim=1)
    return torch.take_along_dim(m, cols.view(cols.shape[0], *([1] * (m.dim() - 2)), cols.shape[1]), dim=-1)


def _fix_invalid(m: torch.Tensor, valid_cols: torch.Tensor, invalid_rows: torch.Tensor | None) -> torch.Tensor:
    """Mask invalid columns; let each invalid row attend to its own slot only.

    m: [B, 1, Ls, K] with K >= Ls (a static cache has more key slots than rows)."""
    diag = None
    if invalid_rows is not None:
        diag = torch.diag_embed(invalid_rows)[:, None]  # [B, 1, Ls, Ls]
        if m.shape[-1] > diag.shape[-1]:
            diag = torch.nn.functional.pad(diag, (0, m.shape[-1] - diag.shape[-1]))
    if m.dtype == torch.bool:
        m = m & valid_cols[:, None, None, :]
        return m if diag is None else m | diag
    low = torch.finfo(m.dtype).min
    m = m.masked_fill(~valid_cols[:, None, None, :], low)
    return m if diag is None else m.masked_fill(diag, 0.0)


def slice_prefill_mask(
    mask: torch.Tensor | None, index0: torch.Tensor, valid: torch.Tensor, kind: MaskKind, dtype: torch.dtype,
    all_valid: bool | None = None,
) -> torch.Tensor | None:
    """The level's prefill mask from the level-0 mask.

    mask: [B|1, 1, L0, L0], [B, L0] or None; index0, valid: [B, Ls]. Returns the same format,
    [B, 1, Ls, Ls] or [B, Ls], or None when a plain causal mask still fits.
    """
    has_invalid = not (bool(valid.all()) if all_valid is None else all_valid)
    if mask is None:
        if not has_invalid:
            return None
        if kind == "2d":
            return valid.long()
        length = index0.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=index0.device).tril()
        mask = causal.expand(index0.shape[0], 1, length, length)
        mask = _fix_invalid(mask, valid, ~valid)
        if kind == "float":
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        return mask
    if mask.dim() == 2:
        return _gather_last(mask, index0) * valid.to(mask.dtype)
    mask = _rows_and_columns(mask, index0, index0)
    return _fix_invalid(mask, valid, ~valid if has_invalid else None) if has_invalid else mask


def level_columns(
    index0: torch.Tensor, valid: torch.Tensor, level0_length: int, width: int, kv_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A level's key slots as level-0 mask columns: [B, width] columns and [B, width] validity.

    index0, valid: [B, Ls], the level's kept prefix. Slot Ls + s holds level-0 column
    level0_length + s (the s-th decoded token), a real key only while that column is
    < kv_length (a static cache has `width` slots, more than are filled).
    """
    b, ls = index0.shape
    tail = torch.arange(level0_length, level0_length + width - ls, device=index0.device).expand(b, -1)
    return torch.cat([index0, tail], dim=1), torch.cat([valid, tail < kv_length], dim=1)


@lru_cache(maxsize=32)
def _head_and_samples(batch: int, device: torch.device, inference: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """([1, 1, 1, 1] zero, [B, 1, 1, 1] 0..B-1) long: the head and sample indices of a 4-D mask's
    advanced index (made once per size, device and inference mode, never written)."""
    samples = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    return samples[:1] * 0, samples


def _rows_and_columns(mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """mask [B|1, 1, Q, K] -> [B, 1, Ls, n]: rows [B, Ls] and columns [B, n] of each sample, in
    one advanced index (two `take_along_dim`s would be twice the ops and the memory traffic)."""
    b = rows.shape[0]
    head, samples = _head_and_samples(b, rows.device, torch.is_inference_mode_enabled())
    sample = samples if mask.shape[0] == b else head  # a batch-1 mask serves every sample
    return mask[sample, head, rows.view(b, 1, -1, 1), cols.view(b, 1, 1, -1)]


def slice_static_prefill_mask(
    mask: torch.Tensor | None, index0: torch.Tensor, valid: torch.Tensor, level0_length: int, width: int,
    kind: MaskKind, dtype: torch.dtype, all_valid: bool | None = None,
) -> torch.Tensor | None:
    """A level's prefill mask under a static cache, whose layers return keys for all `width` slots.

    mask: [B|1, 1, L0, width], [B, width] or None. Returns [B, 1, Ls, width], [B, width], or
    None when the top-left causal mask sdpa applies for a None mask still fits.
    """
    cols, valid_cols = level_columns(index0, valid, level0_length, width, level0_length)
    invalid_rows = None if (bool(valid.all()) if all_valid is None else all_valid) else ~valid
    if mask is None:
        if invalid_rows is None:
            return None
        if kind == "2d":
            return valid_cols.long()
        ls = index0.shape[1]
        mask = torch.ones(ls, width, dtype=torch.bool, device=index0.device).tril().expand(index0.shape[0], 1, ls, width)
        mask = _fix_invalid(mask, valid_cols, invalid_rows)
        if kind == "float":
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        return mask
    cols = cols.clamp(max=mask.shape[-1] - 1)
    if mask.dim() == 2:
        return _gather_last(mask, cols) * valid_cols.to(mask.dtype)
    return _fix_invalid(_rows_and_columns(mask, index0, cols), valid_cols, invalid_rows)


def slice_decode_mask(
    mask: torch.Tensor | None, index0: torch.Tensor, valid: torch.Tensor, level0_length: int,
    kv_length: int, q_length: int, kind: MaskKind, dtype: torch.dtype, width: int | None = None,
    all_valid: bool | None = None,
) -> torch.Tensor | None:
    """The level's decode-step mask. mask: [B|1, 1, q, kv0], [B, kv0] or None.

    kv_length: level-0 keys after this step; width: the level's key slots (a static cache's
    `max_cache_len`; by default the level's kept prefix plus every decoded token). all_valid:
    whether every slot of `valid` is True, when the caller knows it (saves a device sync).
    """
    dynamic_width = index0.shape[1] + kv_length - level0_length
    width = dynamic_width if width is None else width
    cols, valid_cols = level_columns(index0, valid, level0_length, width, kv_length)
    has_invalid = not bool(valid_cols.all()) if all_valid is None else (not all_valid or width > dynamic_width)
    if mask is None:
        if not has_invalid:
            return None
        if kind == "2d":
            return valid_cols.long()
        allowed = valid_cols[:, None, None, :].expand(-1, 1, q_length, -1)
        if kind == "bool":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    cols = cols.clamp(max=mask.shape[-1] - 1)
    if mask.dim() == 2:
        return _gather_last(mask, cols) * valid_cols.to(mask.dtype)
    mask = _gather_last(mask, cols)
    return _fix_invalid(mask, valid_cols, None) if has_invalid else mask
