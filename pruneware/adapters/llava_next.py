"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): anyres tiles, a base image, newline rows.

Each image's placeholder run holds, in order, the base image (the whole picture at one tile's
resolution: a side x side grid, 24x24 at 336 px) and then the high-res tiles stitched into
one grid and unpadded to the picture's aspect ratio (h x w), written row by row with the
model's `image_newline` embedding after each row: `side*side + h*(w + 1)` tokens. The layout
gives each image two units with their own grids, the base (side, side) and the high-res
(h, w), so a stage's budget splits between them and grid-aware policies (crosslmm pooling,
viz) see true 2-D grids.

Newline rows are always kept: they are laid out as text (image id -1). They carry the 2-D row
structure of the high-res grid to the language model and are few (h per image), so dropping
them would save little and leave the surviving tokens of different rows run together.

Vision-side stages (`vitK`, `pre-vit`) prune the same two units per image inside the tiles' CLIP
passes (`clip_vit_next.NextVisionCut`); the newline rows are never theirs to prune.

Where the grids come from: a plain forward passes `image_sizes`, and the unpadded grid follows
from transformers' own anyres arithmetic (`get_anyres_image_grid_shape`, `unpad_image`).
`generate()` encodes the pixels first and drops `image_sizes`; the per-image features then
arrive as `mm_encoder_outputs["image"].pooler_output`, and the newline rows are found in them
by exact equality with `image_newline` (the model copies it there unchanged).
"""

from __future__ import annotations

from typing import Any

import torch

from pruneware.adapters.base import Adapter, VisualItem, VisualLayout, items_to_layout
from pruneware.adapters.clip_vit_next import NextGrid, NextVisionCut
from pruneware.adapters.registry import register_adapter
from pruneware.adapters.vision import cls_attention
from pruneware.adapters.vision_flops import llava_next_flops


@register_adapter
class LlavaNextAdapter(Adapter):
    model_types = ("llava_next",)
    rope = "1d"

    def visual_token_ids(self) -> list[int]:
        return [self.config.image_token_id]

    def base_grid(self) -> tuple[int, int]:
        """The grid of the base image (and of one tile): 24x24 at 336 px."""
        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        return side, side

    def _base_tokens(self) -> int:
        h, w = self.base_grid()
        return h * w + (1 if self.config.vision_feature_select_strategy == "full" else 0)

    def input_vision_flops(self, inputs: dict[str, Any]) -> list[float]:
        # a tower call sees the tiles of the whole batch flattened: counted from the inputs only
        return llava_next_flops(self.config, inputs.get("pixel_values"), inputs.get("image_sizes"))

    # vision-side stages (`vitK`, `pre-vit`; see clip_vit_next.py) ----
    def vision_encoder(self) -> torch.nn.Module:
        return self.base_model.vision_tower

    def vision_cut(self) -> NextVisionCut:
        return NextVisionCut(self.config, self.base_model)

    def vision_call_scores(self, query, key, scale, kwargs):
        # query, key: [n_tiles, H, 1 + side^2, d]; token 0 is [CLS] (read by a vitK stage only)
        return cls_attention(query, key, scale), key[:, :, 1:].float().mean(dim=1)

    def vision_image_scores(self, parts, grid: NextGrid):
        """Per image, its units' [CLS] attention and keys (base patches, then the unpadded high-res grid)."""
        scores, keys = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        sizes = [sum(h * w for h, w in f) for f in grid.frames]
        tile, patch = grid.unit_tile.to(scores.device), grid.unit_patch.to(scores.device)
        return list(scores[tile, patch].split(sizes)), list(keys[tile, patch].split(sizes))

    def layout(self, input_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> VisualLayout:
        if not bool((input_ids == self.config.image_token_id).any()):
            return items_to_layout(input_ids, [])
        sizes = model_kwargs.get("image_sizes")
        if sizes is not None:
            return items_to_layout(input_ids, [self._item_from_size(s) for s in sizes.tolist()])
        output = (model_kwargs.get("mm_encoder_outputs") or {}).get("image")
        if output is None:
            raise ValueError("input_ids hold image tokens but neither image_sizes nor image features were given")
        return items_to_layout(input_ids, [self._item_from_features(f) for f in output.pooler_output])

    def _item(self, h: int, w: int) -> VisualItem:
        """An image whose high-res grid is h x w (w == 0: base image only, then one newline)."""
        base = self._base_tokens()
        if w == 0:
            units = torch.cat([torch.zeros(base, dtype=torch.long), torch.tensor([-1])])
            return VisualItem(self.config.image_token_id, (self.base_grid(),), (base,), units)
        column = torch.arange(h * (w + 1)) % (w + 1)
        high = torch.where(column == w, -1, 1)
        units = torch.cat([torch.zeros(base, dtype=torch.long), high])
        return VisualItem(self.config.image_token_id, (self.base_grid(), (h, w)), (base, h * w), units)

    def _item_from_size(self, size: list[int]) -> VisualItem:
        """The layout `pack_image_features` gives an image of `size` (height, width) pixels."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        side = self.base_grid()[0]
        tile = self.config.vision_config.image_size
        rows, cols = get_anyres_image_grid_shape(size, self.config.image_grid_pinpoints, tile)
        h, w = unpad_image(torch.empty(0, rows * side, cols * side), size).shape[1:]
        return self._item(h, w)

    def _item_from_features(self, features: torch.Tensor) -> VisualItem:
        """The layout of one image's packed features [n, D], read from its newline rows."""
        newline = self.base_model.image_newline.to(features.device, features.dtype)
        base = self._base_tokens()
        ends = (features[base:] == newline).all(dim=-1).nonzero().squeeze(1)
        h, w = len(ends), int(ends[0]) if len(ends) else -1
        expected = torch.arange(1, h + 1, device=features.device) * (w + 1) - 1
        if h == 0 or len(features) != base + h * (w + 1) or not torch.equal(ends, expected):
            raise ValueError(
                f"cannot read the anyres layout of an image with {len(features)} features: "
                f"expected {base} base tokens then rows ending in image_newline; pass image_sizes"
            )
        return self._item(h, w)
