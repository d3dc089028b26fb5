"""Qwen2-VL (`Qwen2VLForConditionalGeneration`): dynamic resolution, M-RoPE, images and video.

The layout, grids and positions are those of the shared Qwen base (see `qwen_common.py`).
"""

from __future__ import annotations

from pruneware.adapters.qwen_common import QwenVLAdapter
from pruneware.adapters.registry import register_adapter
from pruneware.adapters.vision_flops import QwenTower


@register_adapter
class Qwen2VLAdapter(QwenVLAdapter):
    model_types = ("qwen2_vl",)
    vllm_head_dim_from_width = True

    def tower_shape(self) -> QwenTower:
        vc = self.config.vision_config  # Qwen2-VL's blocks are `embed_dim` wide, its merger outputs `hidden_size`
        return QwenTower(vc.embed_dim, int(vc.embed_dim * vc.mlp_ratio), vc.hidden_size)
