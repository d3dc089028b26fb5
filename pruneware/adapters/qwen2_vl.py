"""Qwen2-VL (`Qwen2VLForConditionalGeneration`): dynamic resolution, M-RoPE, images and video.

The layout, grids and positions are those of the shared Qwen base (see `qwen_common.py`).
"""

from __future__ import annotations

from pruneware.adapters.qwen_common import QwenVLAdapter
from pruneware.adapters.registry import register_adapter


@register_adapter
class Qwen2VLAdapter(QwenVLAdapter):
    model_types = ("qwen2_vl",)
