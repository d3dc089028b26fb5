"""Positions of the kept tokens in vLLM: the same as in pruneware's Hugging Face path.

In the HF path a `pre` stage keeps each kept token's original position (1-D index on LLaVA,
(t, row, col) on Qwen) and the text after an image keeps its original position too; `compact`
re-indexes every token consecutively; merged (pooled) tokens on Qwen sit on the pooled grid, as
for a lower-resolution image (`Adapter.merged_positions`).

vLLM computes a request's positions once, when it is scheduled (`get_mrope_input_positions`,
with a decode delta), before the vision encoder has chosen which tokens to keep. So the
positions are built in two parts:

- **At scheduling** (`request_positions`): text positions are exact, because the full item's
  extent is known from its grid; each placeholder slot of a kept-position item sits at the
  item's start (plus its frame's temporal position); pooled items get their pooled grid.
- **In the forward step** (`PositionOffsets`): `embed_multimodal` returns each kept row with
  `OFFSET_CHANNELS` extra channels that carry the kept token's offset from that start, as
  base-256 digits (exact in bf16 and fp16); `embed_input_ids` strips them and `forward` adds
  them to the positions of the placeholder slots before the first layer. The offsets travel
  with the embeddings through vLLM's encoder cache, so chunked prefill and prefix caching see
  the same values.

LLaVA uses 1-D RoPE; in vLLM it is served through the M-RoPE path with all rotary pairs on
one axis (`ONE_AXIS_MROPE`), which is plain 1-D RoPE at positions of our choosing.
This module does not import vllm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# (t, h, w) offsets, two base-256 digits each (offsets up to 65535), the in-LLM stage that drops
# the token when that is known before the forward (0: none), and the item's token count before
# any pruning (two digits; scored in-LLM stages take their budget from it). See `deep_layers`.
OFFSET_CHANNELS = 9
_BASE = 256


def attach_offsets(rows: torch.Tensor, offsets: torch.Tensor, levels: torch.Tensor | None = None,
                   original: int = 0) -> torch.Tensor:
    """rows: [k, D]; offsets: [k, 3] long, each in [0, 65536); levels: [k] long in [0, 256), the
    in-LLM stage that drops each row (0: none; default all 0); original: the item's token count
    before pruning, < 65536. Returns [k, D + OFFSET_CHANNELS]."""
    if offsets.numel() and (offsets.min() < 0 or offsets.max() >= _BASE * _BASE):
        raise ValueError(f"position offsets must lie in [0, {_BASE * _BASE}), got [{offsets.min()}, {offsets.max()}]")
    if not 0 <= original < _BASE * _BASE:
        raise ValueError(f"an item's token count must lie in [0, {_BASE * _BASE}), got {original}")
    if levels is None:
        levels = torch.zeros(offsets.shape[0], dtype=torch.long, device=offsets.device)
    count = torch.tensor([[original // _BASE, original % _BASE]], device=offsets.device).expand(offsets.shape[0], 2)
    digits = torch.cat([offsets // _BASE, offsets % _BASE, levels[:, None].to(offsets.device), count], dim=1)  # [k, 9]
    return torch.cat([rows, digits.to(rows.device, rows.dtype)], dim=1)


def split_offsets(embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `attach_offsets`: ([n, D] rows, [n, 3] long offsets, [n] long levels, [n] long
    item token counts)."""
    digits = embeds[:, -OFFSET_CHANNELS:].float().round().long()
    return (embeds[:, :-OFFSET_CHANNELS], digits[:, :3] * _BASE + digits[:, 3:6], digits[:, 6],
            digits[:, 7] * _BASE + digits[:, 8])


def kept_offsets(keep: torch.Tensor, rows: int, cols: int, one_axis: bool) -> torch.Tensor:
    """[k, 3] offsets of kept tokens from their frame's start.

    keep: [k] original token index within the item (frame-major raster order).
    one_axis: 1-D positions (LLaVA: the index itself on every axis), else (0, row, col) within
    the token's frame (its temporal position is set at scheduling).
    """
    if one_axis:
        return keep[:, None].expand(-1, 3).long()
    local = keep % (rows * cols)
    return torch.stack([torch.zeros_like(local), local // cols, local % cols], dim=1).long()


@dataclass(frozen=True)
class ItemBlock:
    """One multimodal item of a prompt, as `request_positions` lays it out.

    Attributes:
        offset: index of its first placeholder in the (pruned) prompt.
        slots: [3, placeholders] positions of its placeholders relative to the item's start,
            before any forward-time offset (pooled grids are exact here; kept-position items hold
            each slot's frame time only).
        extent: how far the text after it starts from the item's start.
    """

    offset: int
    slots: np.ndarray
    extent: int


def request_positions(length: int, blocks: list[ItemBlock], compact: bool) -> tuple[torch.Tensor, int]:
    """([3, length] positions, decode delta) of a prompt of `length` tokens."""
    if compact:
        return torch.arange(length, dtype=torch.long).expand(3, -1).contiguous(), 0
    parts: list[np.ndarray] = []
    cursor, position = 0, 0
    for block in sorted(blocks, key=lambda b: b.offset):
        text = block.offset - cursor
        parts.append(np.broadcast_to(np.arange(text), (3, text)) + position)
        start = position + text
        parts.append(block.slots + start)
        position = start + block.extent
        cursor = block.offset + block.slots.shape[1]
    if cursor < length:
        parts.append(np.broadcast_to(np.arange(length - cursor), (3, length - cursor)) + position)
        position += length - cursor
    positions = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), dtype=np.int64)
    return torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64)), position - length


def frame_times(frames: int, per_frame: int, t_factor: float) -> np.ndarray:
    """[3, frames * per_frame] slots at their frame's temporal position (rows and cols 0)."""
    t = (np.arange(frames) * t_factor).astype(np.int64) if t_factor != 1.0 else np.arange(frames)
    slots = np.zeros((3, frames * per_frame), dtype=np.int64)
    slots[0] = np.repeat(t, per_frame)
    return slots


def grid_extent(frames: int, rows: int, cols: int, t_factor: float) -> int:
    """Positions a full (frames, rows, cols) item spans, as Qwen's get_rope_index lays it out."""
    t_last = int((frames - 1) * t_factor) if t_factor != 1.0 else frames - 1
    return max(t_last, rows - 1, cols - 1) + 1


class PositionOffsets:
    """Mixin for a vLLM model whose `embed_multimodal` appends `OFFSET_CHANNELS` to its rows.

    vLLM's model runner calls `embed_input_ids` and then `forward` in the same step, in the same
    process; the offsets of that step's placeholder slots are held in between.
    """

    _pending_offsets: torch.Tensor | None = None
    _pending_levels: tuple[torch.Tensor, torch.Tensor] | None = None  # ([N, 2] (level, item count), [N] visual)
    deep_layers: Any = None  # a `DeepLayers` when the plan has in-LLM stages

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings: Any = None, *,
                        is_multimodal: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        self._pending_offsets = self._pending_levels = None
        if multimodal_embeddings is None or len(multimodal_embeddings) == 0:
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kwargs)
        parts = [split_offsets(e) for e in multimodal_embeddings]
        offsets = torch.zeros(input_ids.shape[0], 3, dtype=torch.long, device=input_ids.device)
        offsets[is_multimodal] = torch.cat([p[1] for p in parts]).to(input_ids.device)
        rows = torch.zeros(input_ids.shape[0], 2, dtype=torch.long, device=input_ids.device)  # (level, item count)
        rows[is_multimodal] = torch.cat([torch.stack([p[2], p[3]], 1) for p in parts]).to(input_ids.device)
        self._pending_offsets, self._pending_levels = offsets, (rows, is_multimodal)
        return super().embed_input_ids(input_ids, [p[0] for p in parts], is_multimodal=is_multimodal, **kwargs)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, *args: Any, **kwargs: Any):
        offsets, self._pending_offsets = self._pending_offsets, None
        levels, self._pending_levels = self._pending_levels, None
        if offsets is not None and positions.dim() == 2:
            positions = positions.clone()
            positions[:, : offsets.shape[0]] += offsets.T.to(positions.device)
        if self.deep_layers is None:
            return super().forward(input_ids, positions, *args, **kwargs)
        with self.deep_layers.step(levels, positions):
            return super().forward(input_ids, positions, *args, **kwargs)


class OneAxisMRoPE:
    """vLLM per-architecture config hook (`MODELS_CONFIG_MAP`) for a 1-D RoPE model: declares an
    `mrope_section` with every rotary pair on the first axis, so vLLM computes positions per
    request (`get_mrope_input_positions`) and applies them as plain 1-D RoPE."""

    @staticmethod
    def verify_and_update_model_config(model_config: Any) -> None:
        text = model_config.hf_config.get_text_config()
        rope = dict(getattr(text, "rope_parameters", None) or {})
        if "mrope_section" in rope:
            return
        if rope.get("rope_type", "default") != "default":
            raise ValueError(
                f"pruneware keeps original positions in vLLM through plain RoPE; rope_type "
                f"{rope.get('rope_type')!r} is not supported. Use a plan with ':compact' positions."
            )
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        rotary = int(head_dim * rope.get("partial_rotary_factor", 1.0))
        rope.setdefault("rope_type", "default")
        rope["mrope_section"] = [rotary // 2, 0, 0]
        text.rope_parameters = rope

    @staticmethod
    def verify_and_update_config(vllm_config: Any) -> None:
        return None
