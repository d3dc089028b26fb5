"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): dynamic resolution, M-RoPE positions.

Each image's token count is `t * h * w / merge**2` from `image_grid_thw`; images are laid out
in the order they appear in the batch. Positions are 3-D ([3, B, L], or [4, B, L] with the
text positions first under `generate`) and are kept as the model computed them.
"""

from __future__ import annotations

from typing import Any

import torch

from pruneware.adapters.base import Adapter, VisualLayout
from pruneware.adapters.registry import register_adapter


@register_adapter
class Qwen2_5_VLAdapter(Adapter):
    model_types = ("qwen2_5_vl",)
    rope = "mrope"

    def visual_token_ids(self) -> list[int]:
        return [self.config.image_token_id]

    def vision_tower(self) -> torch.nn.Module:
        return self.base_model.visual

    def layout(self, input_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> VisualLayout:
        # Under generate(), the vision tower runs first and image_grid_thw is not passed on:
        # the session records the grid the tower saw.
        grid_thw = model_kwargs.get("image_grid_thw")
        if grid_thw is None:
            grid_thw = model_kwargs.get("seen_grid_thw")
        if grid_thw is None:
            if bool((input_ids == self.config.image_token_id).any()):
                raise ValueError("input_ids hold image tokens but no image_grid_thw was given")
            return self._runs_to_layout(input_ids, [], [])
        merge = self.config.vision_config.spatial_merge_size
        sizes, grids = [], []
        for t, h, w in grid_thw.tolist():
            sizes.append(t * h * w // merge**2)
            grids.append((h // merge, w // merge))
        return self._runs_to_layout(input_ids, sizes, grids)

    def pooled_positions(
        self, mm_token_type_ids: torch.Tensor, grids: list[list[tuple[int, int]]], attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """M-RoPE positions [3, B, L] for merged tokens laid out on pooled grids.

        The model's own `get_rope_index` runs on a grid of (h, w) merged tokens per image, as
        if each image had that lower resolution; text after an image continues from the
        pooled grid, exactly as for a genuinely smaller image.
        """
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
