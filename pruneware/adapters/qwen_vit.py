"""Cutting a Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision tower between blocks (`vitK` and `pre-vit` stages).

The tower holds each image (or video frame) as rows of patches, grouped in 2x2 *units* (the
merge groups the PatchMerger turns into one visual token). Qwen2-VL holds the units row-major;
Qwen2.5-VL permutes them window by window (`window_index`) and runs most blocks within windows
(`cu_window_seqlens`), the blocks in `fullatt_block_indexes` over each frame (`cu_seqlens`).
A cut keeps whole units, so the merger still sees complete groups, and before block K replaces
what the tower's loop passes every block: the rows, `cu_seqlens` per frame, the (now ragged)
windows' `cu_window_seqlens`, the rotary rows (already in the tower's order) and `max_seqlen`.
After the merger the kept tokens are spread back over every unit's slot (zeros elsewhere), so
the tower's own un-permute and the language model's placeholders still line up (Qwen3-VL's DeepStack
taps after the cut read the kept rows, and are spread the same way); the engine then
drops the other slots as a `pre` stage with the same kept set would.
Several vision-side stages in one plan cut in turn: each later cut keeps a subset of the
earlier one's units (`cut(..., parent=)`) and takes its rows from the rows the earlier cut left.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from pruneware.adapters.qwen_vit_flops import cut_call_flops
from pruneware.adapters.vision_flops import QwenTower


@dataclass
class TowerCut:
    """One encoder call's cut.

    Attributes:
        keep: [n_units] bool, row-major over the call's units (image after image, frame after frame).
        kept_pos: [k] the kept units' positions in the tower's own order (ascending).
        rows: [k * unit] the kept patch rows in the tower's order.
        cu_full, cu_window: int32 boundaries of the kept rows' attention sequences (per frame,
            per window; empty ones dropped); cu_window is None for Qwen2-VL.
        position_embeddings: (cos, sin) [k * unit, d], sliced once at the first cut block.
        parent: the earlier cut of the same call whose rows this one's block receives (None: the full rows).
        frame_units: the units every frame keeps, when known on the host (else None).
        window_units: [n_windows] the units kept per window, windows in the tower's order (image,
            frame, then row-major), as `cu_window` counts them; None for Qwen2-VL.
    """

    keep: torch.Tensor
    kept_pos: torch.Tensor
    rows: torch.Tensor
    cu_full: torch.Tensor
    cu_window: torch.Tensor | None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    parent: TowerCut | None = None
    frame_units: int | None = None
    window_units: torch.Tensor | None = None


def _lengths_to_cu(lengths: torch.Tensor) -> torch.Tensor:
    """[n] sequence lengths -> [m + 1] int32 bounds of the m non-empty ones (empty sequences vanish)."""
    cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return torch.unique_consecutive(cu)


def _on(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """x on `device` (no op when it is there already)."""
    return x if x.device == device else x.to(device)


def _unit_rows(unit: int, device: torch.device) -> torch.Tensor:
    """[unit] 0..unit-1: a unit's patch rows from its first (made once per device and inference
    mode, never written)."""
    return _arange(unit, device, torch.is_inference_mode_enabled())


@lru_cache(maxsize=64)
def _arange(n: int, device: torch.device, inference: bool) -> torch.Tensor:
    return torch.arange(n, device=device)


@lru_cache(maxsize=64)
def _uniform_cu(n_frames: int, step: int, device: torch.device, inference: bool) -> torch.Tensor:
    """[n_frames + 1] int32 bounds of n_frames sequences of `step` rows each, as `_lengths_to_cu`
    gives them (made once per shape, device and inference mode, never written)."""
    return torch.arange(0, (n_frames + 1) * step, step, dtype=torch.int32, device=device)


class QwenVisionCut:
    """The `Adapter.vision_cut()` of the Qwen2-VL, Qwen2.5-VL and Qwen3-VL towers."""

    def __init__(self, visual: torch.nn.Module, tower: QwenTower,
                 host_grid: Callable[[torch.Tensor], list[list[int]]] | None = None):
        self.visual = visual
        self.host_grid = host_grid  # grid_thw -> its host copy, shared with the layout's read (None: tolist)
        self.tower = tower
        self.config = visual.config
        self.merge = visual.spatial_merge_size
        self.unit = self.merge**2
        full = getattr(visual, "fullatt_block_indexes", None)
        self.windowed = full is not None
        self.full_blocks = set(full) if full is not None else set(range(len(visual.blocks)))
        self.taps = list(getattr(visual, "deepstack_visual_indexes", None) or [])  # Qwen3-VL's DeepStack

    @classmethod
    def rules_only(cls, visual: torch.nn.Module) -> QwenVisionCut:
        """The cut's unit and window rules for a Qwen2.5-VL tower this class does not drive (vLLM's):
        window order on, no DeepStack taps, the grid read by the cut itself; no tower shape or config."""
        cut = cls.__new__(cls)
        cut.visual, cut.host_grid, cut.tower, cut.config = visual, None, None, None
        cut.merge = visual.spatial_merge_size
        cut.unit, cut.windowed, cut.taps = cut.merge**2, True, []
        cut.full_blocks = set(visual.fullatt_block_indexes)
        return cut

    @property
    def depth(self) -> int:
        return len(self.visual.blocks)

    @property
    def blocks(self) -> torch.nn.ModuleList:
        return self.visual.blocks

    def attention(self, block: int) -> torch.nn.Module:
        return self.visual.blocks[block].attn

    def call_grid(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The call's grid_thw [n, 3]."""
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid is None:
            raise RuntimeError("a vision-side stage needs the vision tower's grid_thw")
        return grid

    def units(self, grid: torch.Tensor) -> list[tuple[int, int, int]]:
        """Per image of the call, (t, units high, units wide) (read once per grid tensor)."""
        def build() -> list[tuple[int, int, int]]:
            rows = self.host_grid(grid) if self.host_grid is not None else grid.tolist()
            return [(t, h // self.merge, w // self.merge) for t, h, w in rows]

        return self._per_grid("units", grid, build)

    def _per_grid(self, name: str, grid: torch.Tensor, build: Callable[[], Any]) -> Any:
        """What `build` derives from `grid`, computed once while the same grid tensor comes back (the
        calls of one encoder call): each derivation reads the grid on the host."""
        memo = self.__dict__.setdefault("_grid_memo", {})
        seen = memo.get(name)
        if seen is None or seen[0] is not grid:
            seen = memo[name] = (grid, build())
        return seen[1]

    def call_units(self, grid: torch.Tensor, args: tuple, kwargs: dict) -> list[tuple[int, int, int]]:
        """`units(grid)` of one encoder call; a new call reads its grid afresh (nothing carries over)."""
        self.__dict__.pop("_grid_memo", None)
        return self.units(grid)

    def order(self, grid: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(window_index, cu_window_seqlens) as the tower computes them; (None, None) for Qwen2-VL.

        They depend only on the grid's values, so they are computed from the host-side units (a CPU
        grid: no device read) once per shape and reused (never written to)."""
        if not self.windowed:
            return None, None
        from transformers.vision_utils import get_vision_window_index

        units, v = self.units(grid), self.visual
        orders = self.__dict__.setdefault("_orders", {})
        key = (tuple(units), str(grid.device))
        if key not in orders:
            if len(orders) > 64:  # a bounded memo: many distinct shapes just recompute
                orders.clear()
            host = torch.tensor([[t, hh * self.merge, ww * self.merge] for t, hh, ww in units])
            index, cu = get_vision_window_index(host, v.spatial_merge_size, v.window_size, v.patch_size)
            orders[key] = (index, cu.to(grid.device))
        return orders[key]

    def window_ends(self, grid: torch.Tensor, device: torch.device) -> torch.Tensor:
        """[n_windows] long: where each window of `order(grid)` ends, in units (tower order), on
        `device`; made once per shape, as the order is (never written to)."""
        orders = self.__dict__.setdefault("_orders", {})
        key = ("ends", tuple(self.units(grid)), str(device), torch.is_inference_mode_enabled())
        if key not in orders:
            orders[key] = (_on(self.order(grid)[1], device).long() // self.unit)[1:]  # type: ignore[arg-type]
        return orders[key]

    def unit_features(self, hidden: torch.Tensor, grid: torch.Tensor, cut: TowerCut | None = None) -> torch.Tensor:
        """[n_units, d] the mean of each unit's patch rows, row-major; hidden [n_units * unit, d] in
        tower order, or (after `cut`) [k * unit, d] its kept rows, the other units' rows zeros."""
        wide = hidden if hidden.dtype == torch.float32 else hidden.float()
        feats = wide.view(-1, self.unit, hidden.shape[-1]).mean(dim=1)
        order = self.order(grid)[0]
        if cut is not None:
            pos = _on(cut.kept_pos, feats.device)
            row_major = pos if order is None else _on(order, feats.device)[pos]
            return feats.new_zeros(cut.keep.shape[0], feats.shape[-1]).index_copy_(0, row_major, feats)
        if order is None:
            return feats
        return torch.empty_like(feats).index_copy_(0, _on(order, feats.device), feats)

    def full_parts(self, cut: TowerCut | None, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> list:
        """One block's attention reads (`vision_call_scores` per call), laid over every patch row of
        the call in tower order (zeros on the rows `cut` dropped), as `vision_image_scores` reads them."""
        if cut is None:
            return parts
        scores, keys = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        rows, n = cut.rows.to(scores.device), cut.keep.shape[0] * self.unit
        return [(scores.new_zeros(n).index_copy_(0, rows, scores),
                 keys.new_zeros(n, keys.shape[-1]).index_copy_(0, rows, keys))]

    def pixel_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[n_units, unit * C * tp * P * P] each unit's raw patches: the processor already
        orders patches unit by unit, row-major (as `resize_pixels` reads them)."""
        return pixels.float().reshape(-1, self.unit * pixels.shape[-1])

    def cut(self, grid: torch.Tensor, keep: torch.Tensor, parent: TowerCut | None = None,
            per_frame: int | None = None) -> TowerCut:
        """The cut that keeps the units `keep` ([n_units] bool, row-major) of a call on `grid`
        (a subset of `parent`'s, when an earlier stage of the call cut the tower first).
        per_frame: the units every frame keeps, when known on the host (> 0): the frames'
        sequence bounds are then made once per shape instead of counted on the device."""
        device = keep.device
        order, cu_windows = self.order(grid)
        keep_tower = keep if order is None else keep[_on(order, device)]
        kept_pos = keep_tower.nonzero().squeeze(1)
        rows = (kept_pos[:, None] * self.unit + _unit_rows(self.unit, device)).reshape(-1)
        n_frames = sum(t for t, _, _ in self.units(grid))
        if per_frame:
            cu_full = _uniform_cu(n_frames, per_frame * self.unit, device, torch.is_inference_mode_enabled())
        else:
            frames = torch.tensor([hh * ww for t, hh, ww in self.units(grid) for _ in range(t)], device=device)
            frame_of_unit = torch.repeat_interleave(torch.arange(n_frames, device=device), frames)  # row-major
            cu_full = _lengths_to_cu(torch.bincount(frame_of_unit[keep], minlength=n_frames) * self.unit)
        cu_window = per_window = None
        if cu_windows is not None:
            ends = self.window_ends(grid, device)  # each window's end, in units, tower order
            per_window = torch.bincount(torch.searchsorted(ends, kept_pos, right=True), minlength=len(ends))
            cu_window = _lengths_to_cu(per_window * self.unit)
        return TowerCut(keep, kept_pos, rows, cu_full, cu_window, parent=parent, frame_units=per_frame or None,
                        window_units=per_window)

    def cut_rows(self, grid: torch.Tensor, units: list[tuple[int, int, int]], rows: torch.Tensor,
                 parent: TowerCut | None = None) -> TowerCut:
        """`cut` when every image of the call has `units[0]` units and keeps rows [n, k] of them (sorted)."""
        t, hh, ww = units[0]
        keep = torch.zeros(len(units), t * hh * ww, dtype=torch.bool, device=rows.device).scatter_(1, rows, True)
        return self.cut(grid, keep.view(-1), parent, per_frame=rows.shape[1] if t == 1 else None)

    def cut_hidden(self, cut: TowerCut, hidden: torch.Tensor) -> torch.Tensor:
        """[n_rows, d] in the tower's order (or the rows `cut.parent` kept) -> the kept rows."""
        if cut.parent is None:
            return hidden[_on(cut.rows, hidden.device)]
        local = torch.searchsorted(cut.parent.kept_pos, cut.kept_pos)  # kept units among the parent's
        rows = (local[:, None] * self.unit + torch.arange(self.unit, device=local.device)).reshape(-1)
        return hidden[rows.to(hidden.device)]

    def block_kwargs(self, cut: TowerCut, block: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        """What block `block` (>= the cut) receives instead of the loop's full-size kwargs."""
        if cut.position_embeddings is None:
            cos, sin = kwargs["position_embeddings"]
            cut.position_embeddings = (cos[cut.rows], sin[cut.rows])
        cu = cut.cu_full if (block in self.full_blocks or cut.cu_window is None) else cut.cu_window
        out = {"cu_seqlens": cu, "position_embeddings": cut.position_embeddings}
        if kwargs.get("max_seqlen") is not None:  # flash attention
            out["max_seqlen"] = int((cu[1:] - cu[:-1]).max())
        return out

    def install_outputs(self, current: Callable[[], TowerCut | None]) -> list[Any]:
        """The merger's kept tokens are spread back over every unit's slot (see `spread`)."""

        def after(module, args, output):
            cut = current()
            if cut is None or output.shape[0] == cut.keep.shape[0]:  # a DeepStack tap before the cut
                return None
            return self.spread(cut, output)

        mergers = [self.visual.merger, *getattr(self.visual, "deepstack_merger_list", [])]
        return [m.register_forward_hook(after) for m in mergers]

    def spread(self, cut: TowerCut, merged: torch.Tensor) -> torch.Tensor:
        """[k, D] merger output of the kept units -> [n_units, D] in the tower's order, zeros elsewhere."""
        full = merged.new_zeros(cut.keep.shape[0], merged.shape[-1])
        return full.index_copy_(0, cut.kept_pos, merged)

    def call_flops(self, grid: torch.Tensor, cuts: list[tuple[int, TowerCut]]) -> list[float]:
        """Per image, the FLOPs of a call whose blocks ran on every unit until the first cut, and
        from each cut's block on (the merger after the last) on that cut's kept units.
        cuts: (block, cut) in the order they ran (empty: nothing cut). See `qwen_vit_flops`."""
        return cut_call_flops(self, grid, cuts)
