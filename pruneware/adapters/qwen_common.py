"""What the Qwen vision-language families share: dynamic resolution, images and video, M-RoPE.

Every image and every video frame is a *unit* with its own grid: `grid_thw` is (t, h, w) in
patches, a unit is one temporal step of (h / merge) x (w / merge) tokens, so a video of t steps
is t units and a stage's budget splits across its frames (and the sample's images) in
proportion. Units are numbered in order of appearance, images and videos interleaved, taking
grids from `image_grid_thw` and `video_grid_thw` in order. Positions (temporal ones included)
are kept as the model computed them: 3-D ([3, B, L], or [4, B, L] with the text positions first
under `generate`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from pruneware.adapters.base import Adapter, VisualItem, VisualLayout, items_to_layout

MODALITIES = ("image", "video")


class QwenVLAdapter(Adapter):
    """Shared base of the Qwen2-VL, Qwen2.5-VL and Qwen3-VL adapters (not registered itself)."""

    rope: ClassVar = "mrope"

    def visual_token_ids(self) -> list[int]:
        return [self.config.image_token_id, self.config.video_token_id]

    def token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] int: 0 text, 1 image, 2 video, as Qwen processors build `mm_token_type_ids`."""
        return (input_ids == self.config.image_token_id).int() + 2 * (input_ids == self.config.video_token_id).int()

    def vision_tower(self) -> torch.nn.Module:
        return self.base_model.visual

    def layout(self, input_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> VisualLayout:
        merge = self.config.vision_config.spatial_merge_size
        items = []
        for modality in MODALITIES:
            token = getattr(self.config, f"{modality}_token_id")
            grid_thw = self._grid_thw(model_kwargs, modality)
            if grid_thw is None:
                if bool((input_ids == token).any()):
                    raise ValueError(f"input_ids hold {modality} tokens but no {modality}_grid_thw was given")
                continue
            for t, h, w in grid_thw.tolist():
                grid = (h // merge, w // merge)
                items.append(VisualItem(token, (grid,) * t, (grid[0] * grid[1],) * t))
        return items_to_layout(input_ids, items)

    @staticmethod
    def _grid_thw(model_kwargs: dict[str, Any], modality: str) -> torch.Tensor | None:
        """The (t, h, w) grids of one modality, from the inputs or, under `generate()` (which
        encodes pixels first and drops the grids), from the vision-tower calls the session saw."""
        grid = model_kwargs.get(f"{modality}_grid_thw")
        if grid is not None:
            return grid
        output = (model_kwargs.get("mm_encoder_outputs") or {}).get(modality)
        if output is None:
            return None
        for seen, seen_grid in model_kwargs.get("seen_vision", ()):
            if seen is output:
                return seen_grid
        raise ValueError(
            f"precomputed {modality} features (mm_encoder_outputs) came without {modality}_grid_thw: "
            f"pass {modality}_grid_thw too, or encode the pixels inside the pruneware session"
        )

    def position_inputs(self, input_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> dict[str, Any]:
        return {"input_ids": input_ids, "mm_token_type_ids": model_kwargs.get("mm_token_type_ids"),
                "second_per_grid_ts": model_kwargs.get("second_per_grid_ts")}

    def merged_positions(
        self, inputs: dict[str, Any], index: torch.Tensor, valid: torch.Tensor, grids: list[list[tuple[int, int]]],
        mask: torch.Tensor,
    ) -> torch.Tensor:
        types = inputs["mm_token_type_ids"]
        types = self.token_types(inputs["input_ids"]) if types is None else types
        types = types.to(index.device).gather(1, index) * valid
        return self.pooled_positions(types, grids, mask, inputs["second_per_grid_ts"])

    def video_time_interval(self, video: int, second_per_grid_ts: torch.Tensor | None) -> float:
        """Temporal position step between a video's grid steps (Qwen2-VL: 1)."""
        return 1.0

    def pooled_positions(
        self, mm_token_type_ids: torch.Tensor, grids: list[list[tuple[int, int]]], attention_mask: torch.Tensor,
        second_per_grid_ts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """M-RoPE positions [3, B, L] for merged tokens laid out on pooled grids.

        As the model's own `get_rope_index` would give them for a genuinely lower-resolution
        input: text counts up by one; an image (or a video time step: its temporal position is
        kept) is laid out on its pooled (h, w) grid from the current position; the text after it
        continues from there plus the grid's larger side, as for a smaller image.
        mm_token_type_ids: [B, L] (0 text, 1 image, 2 video); grids: per sample, the pooled grid
        of each unit (image or video time step) in order of appearance.
        """
        batch, length = mm_token_type_ids.shape
        device = mm_token_type_ids.device
        positions = torch.zeros(3, batch, length, dtype=torch.long, device=device)
        video = 0
        for b in range(batch):
            keep = attention_mask[b].bool()
            types = mm_token_type_ids[b][keep].tolist()
            units, parts, current, start = iter(grids[b]), [], 0, 0
            while start < len(types):
                end = start
                while end < len(types) and types[end] == types[start]:
                    end += 1
                count, kind = end - start, types[start]
                if kind == 0:
                    parts.append(torch.arange(count, device=device).expand(3, -1) + current)
                    current += count
                else:
                    frames, taken = [], 0
                    while taken < count:
                        frames.append(next(units))
                        taken += frames[-1][0] * frames[-1][1]
                    step = self.video_time_interval(video, second_per_grid_ts) if kind == 2 else 1.0
                    for t, (h, w) in enumerate(frames):
                        rows = torch.arange(h, device=device).repeat_interleave(w)
                        cols = torch.arange(w, device=device).repeat(h)
                        temporal = torch.full_like(rows, int(t * step))
                        parts.append(torch.stack([temporal, rows, cols]) + current)
                    current += max(max(h, w) for h, w in frames)
                    video += kind == 2
                start = end
            if parts:
                positions[:, b, keep] = torch.cat(parts, dim=1)
        return positions
