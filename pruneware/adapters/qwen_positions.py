"""M-RoPE positions of merged tokens laid out on pooled grids (Qwen's `pooled_positions`), built on
the host after one read of the kept tokens' types and the mask, and handed over in one copy."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from pruneware.kernels.host import as_tensor


def pooled_mrope_positions(
    mm_token_type_ids: torch.Tensor, grids: list[list[tuple[int, int]]], attention_mask: torch.Tensor,
    interval: Callable[[int], float],
) -> torch.Tensor:
    """[3, B, L] long positions, as the model's own `get_rope_index` would give a genuinely
    lower-resolution input: text counts up by one; an image (or a video time step, whose temporal
    position is `t * interval(video)`) is laid out on its pooled (h, w) grid from the current
    position; the text after it continues from there plus the grid's larger side.

    mm_token_type_ids: [B, L] (0 text, 1 image, 2 video); grids: per sample, the pooled grid of
    each unit (image or video time step) in order of appearance; attention_mask: [B, L], 0 on
    padding (its positions stay 0); interval(video): the temporal step of the video-th video.
    """
    batch, length = mm_token_type_ids.shape
    device = mm_token_type_ids.device
    # The types and the mask in one host read (one sync for the batch); the positions are laid out
    # on the host and handed over in one copy (none on the CPU).
    both = torch.cat([mm_token_type_ids.to(attention_mask.dtype), attention_mask]).tolist()
    positions = np.zeros((3, batch, length), dtype=np.int64)
    video = 0
    for b in range(batch):
        keep = [i for i, real in enumerate(both[batch + b]) if real]
        types = [both[b][i] for i in keep]
        units, parts, current, start = iter(grids[b]), [], 0, 0
        while start < len(types):
            end = start
            while end < len(types) and types[end] == types[start]:
                end += 1
            count, kind = end - start, types[start]
            if kind == 0:
                parts.append(np.broadcast_to(np.arange(count) + current, (3, count)))
                current += count
            else:
                frames, taken = [], 0
                while taken < count:
                    frames.append(next(units))
                    taken += frames[-1][0] * frames[-1][1]
                step = interval(video) if kind == 2 else 1.0
                for t, (h, w) in enumerate(frames):
                    rows, cols = np.repeat(np.arange(h), w), np.tile(np.arange(w), h)
                    parts.append(np.stack([np.full(h * w, int(t * step)), rows, cols]) + current)
                current += max(max(h, w) for h, w in frames)
                video += kind == 2
            start = end
        if parts:
            positions[:, b, keep] = np.concatenate(parts, axis=1)
    out = as_tensor(positions)
    return out if device.type == "cpu" else out.to(device)
