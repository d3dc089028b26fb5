"""Pruned Qwen2-VL for vLLM: `PrunewareQwen2VLForConditionalGeneration`.

The same contract as the Qwen2.5-VL variant (`qwen2_5_vl`): every image and video frame keeps
`PruneSpec.frame(rows, cols).count` tokens, the processor emits that many `<|image_pad|>` /
`<|video_pad|>` placeholders (prompts and profiling), `embed_multimodal` returns exactly those
rows, and M-RoPE positions are those of the HF path: a kept token keeps its original
(t, row, col), the text after an item starts after the full item; merged (pooled) tokens sit on
their pooled grid (`Adapter.merged_positions`); `compact` numbers tokens consecutively.
Qwen2-VL has no window attention and no `second_per_grid_ts`: frame t sits at temporal
position t (t_factor 1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import cached_property, partial
from typing import Any

import torch

from pruneware.integrations.vllm import check_vllm_version

check_vllm_version()  # before the vllm imports below, which older versions lack

from vllm.config import VllmConfig
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFeatureSpec, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import InputProcessingContext, PromptReplacement, PromptUpdate

from pruneware.integrations.vllm.positions import (
    ItemBlock,
    PositionOffsets,
    attach_offsets,
    frame_times,
    grid_extent,
    kept_offsets,
    request_positions,
)
from pruneware.integrations.vllm.prune import prune_item
from pruneware.integrations.vllm.qwen2_5_vl import pseudo_grid_positions
from pruneware.integrations.vllm.spec import PruneSpec, refuse_tower_lora, require_spec

ARCHITECTURE = "PrunewareQwen2VLForConditionalGeneration"


class PrunewareQwen2VLProcessingInfo(Qwen2VLProcessingInfo):
    """Qwen2-VL processing info whose image and video token counts are the pruned ones."""

    def __init__(self, ctx: InputProcessingContext) -> None:
        super().__init__(ctx)
        self.pruneware  # noqa: B018  (a bad plan fails when the processor is built, not per request)

    @cached_property
    def pruneware(self) -> PruneSpec:
        return require_spec(self.get_hf_config(), ARCHITECTURE, "mrope")

    def _get_vision_info(self, **kwargs: Any):  # -> tuple[ImageSize, int]
        # Every max-token, dummy-input and get_num_{image,video}_tokens computation goes here.
        size, full = super()._get_vision_info(**kwargs)
        vision = self.get_hf_config().vision_config
        unit = vision.patch_size * vision.spatial_merge_size
        rows, cols = size.height // unit, size.width // unit
        return size, self.pruneware.item_tokens(full // (rows * cols), rows, cols)


class PrunewareQwen2VLMultiModalProcessor(Qwen2VLMultiModalProcessor):
    """Emits the pruned number of placeholders per image, and per frame for video."""

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, Any],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        info: PrunewareQwen2VLProcessingInfo = self.info  # type: ignore[assignment]
        hf_processor = info.get_hf_processor(**hf_processor_mm_kwargs)
        merge = info.get_image_processor(**hf_processor_mm_kwargs).merge_size
        vocab = info.get_tokenizer().get_vocab()
        placeholder = {"image": vocab[hf_processor.image_token], "video": vocab[hf_processor.video_token]}

        def replacement(item_idx: int, modality: str) -> list[int]:
            grid = out_mm_kwargs[modality][item_idx][f"{modality}_grid_thw"].data
            frames, height, width = map(int, grid)
            return [placeholder[modality]] * info.pruneware.item_tokens(frames, height // merge, width // merge)

        return [
            PromptReplacement(modality=m, target=[placeholder[m]], replacement=partial(replacement, modality=m))
            for m in ("image", "video")
        ]


@MULTIMODAL_REGISTRY.register_processor(
    PrunewareQwen2VLMultiModalProcessor,
    info=PrunewareQwen2VLProcessingInfo,
    dummy_inputs=Qwen2VLDummyInputsBuilder,
)
class PrunewareQwen2VLForConditionalGeneration(PositionOffsets, Qwen2VLForConditionalGeneration):
    """Qwen2-VL whose image and video embeddings are pruned (or pooled) per frame."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        spec = require_spec(vllm_config.model_config.hf_config, ARCHITECTURE, "mrope")
        refuse_tower_lora(vllm_config, ARCHITECTURE)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.pruneware = spec

    def get_encoder_cudagraph_config(self):
        # The CUDA-graph replay path returns raw encoder outputs, bypassing embed_multimodal.
        return replace(super().get_encoder_cudagraph_config(), modalities=[], max_frames_per_video=1)

    def embed_multimodal(self, **kwargs: object) -> tuple[torch.Tensor, ...] | list:
        """One tensor per item, in the order vLLM passed them: [T*k, D + OFFSET_CHANNELS], frame
        by frame, each kept row with its (0, row, col) in its frame (`positions`)."""
        by_modality = self._parse_and_validate_multimodal_inputs(**kwargs)  # keys "images", "videos"
        merge = self.visual.spatial_merge_size
        out: list[torch.Tensor] = []
        for key, item_input in by_modality.items():
            if item_input is None:
                continue
            modality = "image" if key == "images" else "video"
            process = self._process_image_input if modality == "image" else self._process_video_input
            embeds = process(item_input)
            for item, (frames, height, width) in zip(embeds, item_input[f"{modality}_grid_thw"].tolist(), strict=True):
                grid = (frames, height // merge, width // merge)
                rows, keep = prune_item(self.pruneware, item, grid)
                if self.pruneware.policy.needs.merges or self.pruneware.stage.positions == "compact":
                    keep = torch.zeros_like(keep)  # their positions are fixed at scheduling
                out.append(attach_offsets(rows, kept_offsets(keep, *grid[1:], one_axis=False)))
        return tuple(out) if out else []

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[torch.Tensor, int]:
        """[3, L] positions and the decode delta (see the module docstring)."""
        lengths = {f.mm_position.offset: f.mm_position.length for f in mm_features}
        blocks = []
        for offset, frames, rows, cols, t_factor in self.iter_mm_grid_thw(mm_features):
            layout = self.pruneware.frame(rows, cols)
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
