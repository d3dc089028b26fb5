"""LLaVA-1.5 (`LlavaForConditionalGeneration`): CLIP tower, MLP projector, 1-D RoPE LM."""

from __future__ import annotations

from dataclasses import replace

from typing import Any

import torch

from pruneware.adapters.base import Adapter, VisualLayout
from pruneware.adapters.clip_vit import ClipVisionCut
from pruneware.adapters.registry import register_adapter
from pruneware.adapters.vision import cls_attention
from pruneware.adapters.vision_flops import llava_image_flops
from pruneware.errors import PlanError


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
        mask = model_kwargs.get("attention_mask")
        first_real = real = None
        if isinstance(mask, torch.Tensor) and mask.shape == input_ids.shape and mask.device == input_ids.device:
            # The ids and the padding in the layout's one host sync (one op more): where each sample's
            # first real token is, so that scores reading keys' absolute values need not ask the device.
            same = mask if mask.dtype == input_ids.dtype else mask.to(input_ids.dtype)
            both = torch.cat([input_ids, same]).tolist()
            rows, padding = both[: input_ids.shape[0]], both[input_ids.shape[0]:]
            first_real = [row.index(1) if 1 in row else 0 for row in padding]
            real = [len(row) - row.count(0) for row in padding]
        else:
            rows = input_ids.tolist()  # the layout's one host sync
        token, per, grid = self._layout_constants()
        n = sum(row.count(token) for row in rows)
        count = -(-n // per)
        layout = self._runs_to_layout(input_ids, [per] * count, [grid] * count, rows)
        return layout if first_real is None else replace(layout, first_real=first_real, real=real)

    def _layout_constants(self) -> tuple[int, int, tuple[int, int]]:
        """(image token id, tokens per image, grid), read from the config once per adapter
        (a transformers config's attribute access is slow, and a layout runs every forward)."""
        constants = self.__dict__.get("_constants")
        if constants is None:
            constants = self._constants = (self.config.image_token_id, self.tokens_per_image(), self.grid())
        return constants

    def tower_call_flops(self, args: tuple, kwargs: dict[str, Any]) -> list[float]:
        # pixel_values [n, C, H, W]: one entry per image
        pixels = args[0] if args else kwargs.get("pixel_values")
        if pixels is None:
            return []
        return [llava_image_flops(self.config, pixels.shape[-2], pixels.shape[-1])] * pixels.shape[0]

    def input_vision_flops(self, inputs: dict[str, Any]) -> list[float]:
        pixels = inputs.get("pixel_values")
        return [] if pixels is None else self.tower_call_flops((pixels,), {})

    def vision_encoder(self) -> torch.nn.Module:
        return self.base_model.vision_tower

    def vision_cut(self) -> ClipVisionCut:
        return ClipVisionCut(self.config, self.vision_encoder(), self.base_model.multi_modal_projector)

    def vision_score_attention(self) -> torch.nn.Module:
        """The attention of the CLIP layer whose output the projector reads (`vision_feature_layer`:
        hidden_states[v] is the output of encoder layer v - 1, so -2 means layer n - 2)."""
        layer = self.config.vision_feature_layer
        if self.config.vision_feature_select_strategy != "default" or not isinstance(layer, int):
            raise PlanError(
                "vision-side policies need a [CLS] token outside the visual tokens and one feature layer: "
                f"vision_feature_select_strategy='default' (got {self.config.vision_feature_select_strategy!r}) "
                f"and an integer vision_feature_layer (got {layer!r})"
            )
        tower = self.vision_encoder()
        layers = getattr(tower, "vision_model", tower).encoder.layers
        index = len(layers) + layer if layer < 0 else layer - 1
        if not 0 <= index < len(layers):
            raise PlanError(f"vision_feature_layer={layer} reads the embeddings, not an attention layer")
        return layers[index].self_attn

    def vision_call_scores(self, query, key, scale, kwargs):
        # query, key: [n_images, H, 1 + h*w, d]; token 0 is [CLS].
        patches = key[:, :, 1:] if key.dtype == torch.float32 else key[:, :, 1:].float()
        return cls_attention(query, key, scale), patches.mean(dim=1)

    def vision_image_scores(self, parts, grid):
        # Every image has the grid's h*w tokens: [n_images, h*w] and [n_images, h*w, d], in call order.
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
