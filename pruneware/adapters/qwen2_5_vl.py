"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): dynamic resolution, M-RoPE, images and video.

Everything lives in the shared Qwen base (see `qwen_common.py`); video frames are spaced in
time by `second_per_grid_ts`, which only affects the positions the model computes and keeps.
"""

from __future__ import annotations

import torch

from pruneware.adapters.qwen_common import QwenVLAdapter
from pruneware.adapters.registry import register_adapter
from pruneware.adapters.vision_flops import QwenTower


@register_adapter
class Qwen2_5_VLAdapter(QwenVLAdapter):
    model_types = ("qwen2_5_vl",)
    vllm_head_dim_from_width = True

    def tower_shape(self) -> QwenTower:
        """A gated MLP; blocks not in `fullatt_block_indexes` attend within windows."""
        vc = self.config.vision_config
        window_units = vc.window_size // vc.spatial_merge_size // vc.patch_size
        return QwenTower(vc.hidden_size, vc.intermediate_size, vc.out_hidden_size, 3,
                         tuple(vc.fullatt_block_indexes), window_units)  # fmt: skip

    def video_time_interval(self, video: int, second_per_grid_ts: torch.Tensor | None) -> float:
        """tokens_per_second x seconds per grid step, as in the model's `get_rope_index`."""
        seconds = 1.0 if second_per_grid_ts is None else float(second_per_grid_ts[video])
        return self.config.vision_config.tokens_per_second * seconds

    def window_index(self, grid: torch.Tensor) -> torch.Tensor:
        from transformers.vision_utils import get_vision_window_index

        visual = self.base_model.visual
        return get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size, visual.patch_size)[0]
