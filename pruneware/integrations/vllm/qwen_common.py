"""What the pruned Qwen-VL variants share (Qwen2-VL, Qwen2.5-VL; Qwen3-VL takes the first two).

Mixins placed before vLLM's own classes:
- `PrunedQwenInfo` (processing info): the spec, and pruned counts for every max-token,
  dummy-input and `get_num_{image,video}_tokens` computation (`_get_vision_info`);
- `PrunedQwenProcessor` (multimodal processor): the pruned number of `<|image_pad|>` /
  `<|video_pad|>` placeholders per image and per video frame;
- `PrunedQwenModel` (model): `embed_multimodal` returns exactly those rows, frame by frame,
  with each kept row's (0, row, col) in its frame attached (`positions`), and
  `get_mrope_input_positions` lays items out as the HF path does: a kept token at its original
  (t, row, col) and the text after an item after the full item; merged (pooled) tokens on their
  pooled grid, the text `max(rows, cols)` further on (`Adapter.merged_positions`); `compact`
  numbers every token consecutively. Encoder CUDA graphs are off: their replay path skips
  `embed_multimodal`.

A vision-side stage (`vitK`, `pre-vit`; Qwen2.5-VL only, which sets `vit`) returns the rows of the
cut tower instead (`vit.QwenViTRunner`), placed as a `pre` stage's with the same kept units; a
`pre-vit` stage's placeholder count is read from the item's pixels.

Each variant sets `ARCHITECTURE` and may override `spec_for(hf_config, mm_config)` to refuse
what it cannot run. This module does not import vllm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import cached_property, partial
from typing import Any, ClassVar

import numpy as np
import torch

from pruneware.integrations.vllm.positions import (
    ItemBlock,
    PositionOffsets,
    attach_offsets,
    frame_times,
    grid_extent,
    kept_offsets,
    request_positions,
)
from pruneware.integrations.vllm.prune import deep_levels, prune_item
from pruneware.integrations.vllm.spec import FrameLayout, PruneSpec, require_spec


def refuse_evs(architecture: str, mm_config: Any) -> None:
    """vLLM's own video pruning (EVS) cannot run beside the plugin's."""
    if mm_config is not None and mm_config.is_multimodal_pruning_enabled():
        raise ValueError(
            f"{architecture} prunes every image and frame itself; it cannot be combined with vLLM's "
            "video pruning (video_pruning_rate > 0). Unset video_pruning_rate, or use the base architecture."
        )


class PrunedQwenInfo:
    """Processing-info mixin: image and video token counts are the pruned ones."""

    ARCHITECTURE: ClassVar[str]

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)  # type: ignore[call-arg]
        self.pruneware  # noqa: B018  (a bad plan fails when the processor is built, not per request)

    @classmethod
    def spec_for(cls, hf_config: Any, mm_config: Any) -> PruneSpec:
        refuse_evs(cls.ARCHITECTURE, mm_config)
        return require_spec(hf_config, cls.ARCHITECTURE, "mrope")

    @cached_property
    def pruneware(self) -> PruneSpec:
        return self.spec_for(self.get_hf_config(), self.ctx.get_mm_config())  # type: ignore[attr-defined]

    def _get_vision_info(self, **kwargs: Any):  # -> tuple[ImageSize, int]
        size, full = super()._get_vision_info(**kwargs)  # type: ignore[misc]
        vision = self.get_hf_config().vision_config  # type: ignore[attr-defined]
        unit = vision.patch_size * vision.spatial_merge_size
        rows, cols = size.height // unit, size.width // unit
        return size, self.pruneware.item_tokens(full // (rows * cols), rows, cols)


class PrunedQwenProcessor:
    """Multimodal-processor mixin: the pruned number of placeholders per image and video frame."""

    def _get_prompt_updates(
        self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, Any], out_mm_kwargs: Any
    ) -> Sequence[Any]:
        from vllm.multimodal.processing import PromptReplacement

        info = self.info  # type: ignore[attr-defined]
        hf_processor = info.get_hf_processor(**hf_processor_mm_kwargs)
        merge = info.get_image_processor(**hf_processor_mm_kwargs).merge_size
        vocab = info.get_tokenizer().get_vocab()
        placeholder = {"image": vocab[hf_processor.image_token], "video": vocab[hf_processor.video_token]}

        def replacement(item_idx: int, modality: str) -> list[int]:
            item = out_mm_kwargs[modality][item_idx]
            frames, height, width = map(int, item[f"{modality}_grid_thw"].data)
            grid = (frames, height // merge, width // merge)
            count = info.pruneware.item_tokens(*grid)
            if info.pruneware.stage.where == "pre-vit":  # a pre-vit policy may keep fewer (pixelprune)
                from pruneware.integrations.vllm.vit import pixel_keep_count, raw_pixel_norm

                pixels = item["pixel_values" if modality == "image" else "pixel_values_videos"].data
                kept = pixel_keep_count(info.pruneware, pixels, grid, None, raw_pixel_norm(info.ctx.model_config))
                if kept != count and frames > 1:
                    raise ValueError(f"stage {info.pruneware.stage} keeps {kept} of a video's {count} budgeted units: "
                                     "in vLLM a video's frames must keep their whole budget each; send images")
                count = kept
            return [placeholder[modality]] * count

        return [
            PromptReplacement(modality=m, target=[placeholder[m]], replacement=partial(replacement, modality=m))
            for m in ("image", "video")
        ]


class PrunedQwenModel(PositionOffsets):
    """Model mixin: pruned rows with their position offsets, and the HF path's M-RoPE positions."""

    pruneware: PruneSpec
    vit: Any = None  # a `vit.QwenViTRunner` when the plan's stage is vision-side (Qwen2.5-VL)

    def get_encoder_cudagraph_config(self):
        return replace(super().get_encoder_cudagraph_config(), modalities=[], max_frames_per_video=1)  # type: ignore[misc]

    def embed_multimodal(self, **kwargs: object) -> tuple[torch.Tensor, ...] | list:
        """One tensor per item, in the order vLLM passed them: [T*k, D + OFFSET_CHANNELS]."""
        by_modality = self._parse_and_validate_multimodal_inputs(**kwargs)  # type: ignore[attr-defined]
        merge = self.visual.spatial_merge_size  # type: ignore[attr-defined]
        out: list[torch.Tensor] = []
        for key, item_input in by_modality.items():
            if item_input is None:
                continue
            modality = "image" if key.startswith("image") else "video"  # Qwen2-VL says "images"
            if self.vit is not None:
                out += self._embed_vit(item_input, modality)
                continue
            process = self._process_image_input if modality == "image" else self._process_video_input  # type: ignore[attr-defined]
            for item, (frames, height, width) in zip(
                process(item_input), item_input[f"{modality}_grid_thw"].tolist(), strict=True
            ):
                grid = (frames, height // merge, width // merge)
                rows, keep = prune_item(self.pruneware, item, grid)
                if self.pruneware.policy.needs.merges or self.pruneware.stage.positions == "compact":
                    keep = torch.zeros_like(keep)  # their positions are fixed at scheduling
                levels = deep_levels(self.pruneware, rows.shape[0], frames * grid[1] * grid[2], rows.device)
                offsets = kept_offsets(keep, *grid[1:], one_axis=False)
                out.append(attach_offsets(rows, offsets, levels, original=frames * grid[1] * grid[2]))
        return tuple(out) if out else []

    def _embed_vit(self, item_input: Any, modality: str) -> list[torch.Tensor]:
        """embed_multimodal rows of one modality's items for a vision-side stage (see `vit`)."""
        if item_input["type"] not in ("pixel_values", "pixel_values_videos"):
            raise ValueError(f"stage {self.pruneware.stage} runs inside the vision tower: send pixels, "
                             f"not {item_input['type']}")
        grids = item_input[f"{modality}_grid_thw"].tolist()
        pixels = item_input["pixel_values" if modality == "image" else "pixel_values_videos"]
        merge = self.visual.spatial_merge_size  # type: ignore[attr-defined]
        out = []
        for (rows, keep), (frames, height, width) in zip(self.vit.run(pixels, grids), grids, strict=True):
            offsets = kept_offsets(keep, height // merge, width // merge, one_axis=False)
            if self.pruneware.stage.positions == "compact":
                offsets = torch.zeros_like(offsets)
            original = frames * (height // merge) * (width // merge)
            out.append(attach_offsets(rows, offsets, None, original=original))
        return out

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        """[3, L] positions and the decode delta (see the module docstring)."""
        lengths = {f.mm_position.offset: f.mm_position.length for f in mm_features}
        blocks = []
        for offset, frames, rows, cols, t_factor in self.iter_mm_grid_thw(mm_features):  # type: ignore[attr-defined]
            layout = self.pruneware.frame(rows, cols)
            fewer = self.pruneware.stage.where == "pre-vit" and frames == 1 and 0 < lengths[offset] <= layout.count
            if fewer:  # a pre-vit policy kept fewer units of this image than its budget (pixelprune)
                layout = FrameLayout(lengths[offset], layout.rows, layout.cols)
            if lengths[offset] != frames * layout.count:
                raise RuntimeError(
                    f"item at offset {offset} has {lengths[offset]} placeholders, but the plan "
                    f"{self.pruneware.stage} keeps {frames * layout.count}: the prompt was processed with another plan"
                )
            if self.pruneware.policy.needs.merges:
                slots, extent = pseudo_grid_positions(layout, frames, t_factor), max(layout.rows, layout.cols)
            else:
                slots, extent = frame_times(frames, layout.count, t_factor), grid_extent(frames, rows, cols, t_factor)
            blocks.append(ItemBlock(offset, slots, extent))
        return request_positions(len(input_tokens), blocks, self.pruneware.stage.positions == "compact")


def pseudo_grid_positions(layout: FrameLayout, frames: int, t_factor: float = 1.0) -> np.ndarray:
    """[3, frames * layout.count] (t, h, w) of an item's pooled tokens, relative to the item start."""
    index = np.arange(layout.count)
    frame = np.repeat(np.arange(frames), layout.count)
    t = (frame * t_factor).astype(np.int64) if t_factor != 1.0 else frame
    return np.stack([t, np.tile(index // layout.cols, frames), np.tile(index % layout.cols, frames)])
