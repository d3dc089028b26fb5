"""Qwen3-VL (`Qwen3VLForConditionalGeneration`): the Qwen base plus DeepStack.

DeepStack: after each of the first n decoder layers (n = len(vision_config.deepstack_visual_indexes)),
the language model adds features from inner vision-tower layers to the hidden states of the
visual tokens, found through `visual_pos_masks` [B, L] (`_deepstack_process`). Both arrive as
language-model kwargs (`visual_pos_masks`, `deepstack_visual_embeds`: n tensors of
[n_visual, D]). A pruned sequence no longer matches that mask, so the adapter hands them to
the engine (`take_injections`), which removes them from the kwargs and adds each layer's rows
to the visual tokens that are still there, after the same layers (see `VisualInjections`).
Every stage place works: `pre`, and in-LLM stages before, at or after the DeepStack layers.
Qwen3-VL videos carry a timestamp before each frame; frames are still one unit each.
"""

from __future__ import annotations

from typing import Any

from pruneware.adapters.base import VisualInjections
from pruneware.adapters.qwen_common import QwenVLAdapter
from pruneware.adapters.registry import register_adapter
from pruneware.adapters.vision_flops import QwenTower


@register_adapter
class Qwen3VLAdapter(QwenVLAdapter):
    supports_merging = False  # DeepStack features belong to the original tokens, not to merged ones
    model_types = ("qwen3_vl",)

    def tower_shape(self) -> QwenTower:
        vc = self.config.vision_config  # one PatchMerger, plus one per DeepStack layer
        mergers = 1 + len(getattr(vc, "deepstack_visual_indexes", None) or ())
        return QwenTower(vc.hidden_size, vc.intermediate_size, vc.out_hidden_size, mergers=mergers)

    def injection_layers(self) -> int:
        return len(self.config.vision_config.deepstack_visual_indexes)

    def take_injections(self, lm_kwargs: dict[str, Any]) -> VisualInjections | None:
        embeds, mask = lm_kwargs.get("deepstack_visual_embeds"), lm_kwargs.get("visual_pos_masks")
        if embeds is None or mask is None:
            return None
        lm_kwargs["deepstack_visual_embeds"], lm_kwargs["visual_pos_masks"] = None, None
        return VisualInjections(mask.bool(), list(embeds))

