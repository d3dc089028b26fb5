"""The vision FLOPs of a cut Qwen tower call (`QwenVisionCut.call_flops`): what each block ran on,
per image, from the units every cut kept per frame and per window, read to the host at once."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from pruneware.adapters.vision_flops import qwen_tower_flops

if TYPE_CHECKING:
    from pruneware.adapters.qwen_vit import QwenVisionCut, TowerCut


def cut_call_flops(vision_cut: QwenVisionCut, grid: torch.Tensor, cuts: list[tuple[int, TowerCut]]) -> list[float]:
    """Per image, the FLOPs of a call whose blocks ran on every unit until the first cut, and
    from each cut's block on (the merger after the last) on that cut's kept units.
    cuts: (block, cut) in the order they ran (empty: nothing cut)."""
    units = vision_cut.units(grid)
    kept = kept_counts(vision_cut, units, cuts)
    out, window_units, states = [], vision_cut.tower.window_units, [-1, *(block for block, _ in cuts)]
    for (t, hh, ww), per_cut in zip(units, kept, strict=True):
        n = t * hh * ww
        unit = vision_cut.unit
        windows = [s * unit for s in _window_units(hh, ww, window_units)] * t if vision_cut.windowed else None
        lengths = [([hh * ww * vision_cut.unit] * t, windows, n)]  # per state: (per frame rows, per window rows, units)
        for frames, wins in per_cut:
            rows = None if wins is None else [k * vision_cut.unit for k in wins]
            lengths.append(([k * vision_cut.unit for k in frames], rows, sum(frames)))

        def at(block: int) -> int:  # the state block `block` ran in: the last cut at or before it
            return max(i for i, b in enumerate(states) if b <= block)

        sequences = []
        for b in range(vision_cut.depth):
            full, windows, _ = lengths[at(b)]
            sequences.append(full if (b in vision_cut.full_blocks or windows is None) else windows)
        taps = [lengths[at(tap)][2] for tap in vision_cut.taps]  # DeepStack mergers read what their block held
        merged = [lengths[-1][2], *taps]
        out.append(qwen_tower_flops(vision_cut.config, vision_cut.tower, n * vision_cut.unit, sequences, merged))
    return out


def kept_counts(vision_cut: QwenVisionCut, units: list[tuple[int, int, int]], cuts: list[tuple[int, TowerCut]]) -> list:
    """Per image, per cut: (units kept per frame, per window frame by frame in HF's row-major
    tiling, or None unwindowed), read to the host at once. What a cut knows on the host (the
    units every frame keeps) or counted already (the units each window keeps, `window_units`,
    in the same order) is not counted again."""
    parts, start, first_window, wu = [], 0, 0, vision_cut.tower.window_units
    for t, hh, ww in units:
        n, m = t * hh * ww, (t * -(-hh // wu) * -(-ww // wu) if vision_cut.windowed else 0)
        for _, cut in cuts:
            keep = cut.keep[start : start + n].view(t, hh, ww) if cut.frame_units is None else None
            if keep is not None:
                parts.append(keep.sum(dim=(1, 2)))
            if not vision_cut.windowed:
                continue
            if cut.window_units is not None:
                whole = first_window == 0 and m == cut.window_units.shape[0]
                parts.append(cut.window_units if whole else cut.window_units[first_window : first_window + m])
                continue
            keep = cut.keep[start : start + n].view(t, hh, ww) if keep is None else keep
            nh, nw = -(-hh // wu), -(-ww // wu)
            padded = F.pad(keep, (0, nw * wu - ww, 0, nh * wu - hh))
            parts.append(padded.view(t, nh, wu, nw, wu).sum(dim=(2, 4)).flatten())
        start, first_window = start + n, first_window + m
    read = (parts[0] if len(parts) == 1 else torch.cat(parts)) if parts else None
    flat = read.tolist() if read is not None else []  # the FLOPs' one host read
    out, pos = [], 0
    for t, hh, ww in units:
        per_cut = []
        for _, cut in cuts:
            if cut.frame_units is None:
                frames, pos = flat[pos : pos + t], pos + t
            else:
                frames = [cut.frame_units] * t
            wins = None
            if vision_cut.windowed:
                m = t * -(-hh // wu) * -(-ww // wu)
                wins, pos = flat[pos : pos + m], pos + m
            per_cut.append((frames, wins))
        out.append(per_cut)
    return out


def _window_units(hh: int, ww: int, window_units: int) -> list[int]:
    """Units per window of an (hh x ww) unit grid, as HF tiles it (row-major windows)."""
    hs = [min(window_units, hh - i) for i in range(0, hh, window_units)]
    ws = [min(window_units, ww - j) for j in range(0, ww, window_units)]
    return [a * b for a in hs for b in ws]
