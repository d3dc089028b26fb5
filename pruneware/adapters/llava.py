"""LLaVA-1.5 (`LlavaForConditionalGeneration`): CLIP tower, MLP projector, 1-D RoPE LM."""

from __future__ import annotations

from typing import Any

import torch

from pruneware.adapters.base import Adapter, VisualLayout
from pruneware.adapters.registry import register_adapter


@register_adapter
class LlavaAdapter(Adapter):
    model_types = ("llava",)
    rope = "1d"

    def visual_token_ids(self) -> list[int]:
        return [self.config.image_token_id]

    def grid(self) -> tuple[int, int]:
        """The patch grid of one image: 24x24 for LLaVA-1.5 at 336 px."""
        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        return side, side

    def tokens_per_image(self) -> int:
        h, w = self.grid()
        full = self.config.vision_feature_select_strategy == "full"
        return h * w + (1 if full else 0)

    def layout(self, input_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> VisualLayout:
        rows = input_ids.tolist()  # the layout's one host sync
        n = sum(row.count(self.config.image_token_id) for row in rows)
        per = self.tokens_per_image()
        count = -(-n // per)
        return self._runs_to_layout(input_ids, [per] * count, [self.grid()] * count, rows)
