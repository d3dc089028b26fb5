"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): dynamic resolution, M-RoPE, images and video.

Everything lives in the shared Qwen base (see `qwen_common.py`); video frames are spaced in
time by `second_per_grid_ts`, which only affects the positions the model computes and keeps.
"""

from __future__ import annotations

from pruneware.adapters.qwen_common import QwenVLAdapter
from pruneware.adapters.registry import register_adapter


@register_adapter
class Qwen2_5_VLAdapter(QwenVLAdapter):
    model_types = ("qwen2_5_vl",)
