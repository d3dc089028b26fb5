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

    def pooled_positions(
        self, mm_token_type_ids: torch.Tensor, grids: list[list[tuple[int, int]]], attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """M-RoPE positions [3, B, L] for merged tokens laid out on pooled grids.

        The model's own `get_rope_index` runs on a grid of (h, w) merged tokens per image, as
        if each image had that lower resolution; text after an image continues from the
        pooled grid, exactly as for a genuinely smaller image.
        """
        if bool((mm_token_type_ids == 2).any()):
            raise NotImplementedError(
                "merging policies (crosslmm) on video are not supported on M-RoPE models yet; "
                "use a selection policy (random, divprune, fastv, adaptinfer) for video"
            )
        merge = self.config.vision_config.spatial_merge_size
        grid_thw = torch.tensor(
            [(1, h * merge, w * merge) for sample in grids for h, w in sample], dtype=torch.long,
            device=mm_token_type_ids.device,
        ).reshape(-1, 3)
        positions, _ = self.base_model.get_rope_index(
            mm_token_type_ids.long(), mm_token_type_ids=mm_token_type_ids,
            image_grid_thw=grid_thw if len(grid_thw) else None, attention_mask=attention_mask,
        )
        return positions
