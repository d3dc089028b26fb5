"""Pruned Qwen3-VL for vLLM: `PrunewareQwen3VLForConditionalGeneration`.

Every image and video frame keeps `PruneSpec.frame(rows, cols).count` tokens: the processor
emits that many `<|image_pad|>` per image and `<|video_pad|>` per frame (a Qwen3-VL video is
one `<t seconds><|vision_start|>...<|vision_end|>` block per frame), for prompts and profiling,
and `embed_multimodal` returns exactly those rows.

DeepStack: vLLM's Qwen3-VL `embed_multimodal` returns each visual token as one row of
[main | deepstack level 1 | ... | level n] channels, and `embed_input_ids` splits them, adding
the deepstack channels after the first n decoder layers at the visual positions. The policy
scores the main channels (the projected embeddings, as pruneware's HF adapter does) and whole
rows are kept, so the deepstack features are those of the same kept tokens, as in the HF path
(`VisualInjections`). Merging policies (crosslmm) are refused, as in the HF adapter: the
deepstack features belong to original tokens, not to merged ones.

Positions are those of the HF path (see `positions`): each frame (Qwen3-VL gives every frame
temporal position 0 and a text timestamp) keeps its tokens at their original (0, row, col); the
text after it starts after the full frame; `compact` numbers every token consecutively.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from pruneware.integrations.vllm import check_vllm_version

check_vllm_version()  # before the vllm imports below, which older versions lack

from vllm.config import VllmConfig
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFeatureSpec, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from pruneware.errors import PlanError
from pruneware.integrations.vllm.positions import (
    ItemBlock,
    attach_offsets,
    grid_extent,
    kept_offsets,
    request_positions,
)
from pruneware.integrations.vllm.prune import prune_item
from pruneware.integrations.vllm.qwen_common import PrunedQwenInfo, PrunedQwenModel, refuse_evs
from pruneware.integrations.vllm.spec import IN_LLM_FAMILIES, PruneSpec, refuse_in_llm, refuse_tower_lora, require_spec

ARCHITECTURE = "PrunewareQwen3VLForConditionalGeneration"


def _spec(hf_config: Any, mm_config: Any) -> PruneSpec:
    refuse_evs(ARCHITECTURE, mm_config)
    spec = require_spec(hf_config, ARCHITECTURE, "mrope")
    refuse_in_llm(spec, ARCHITECTURE, IN_LLM_FAMILIES)
    if spec.policy.needs.merges:
        raise PlanError(
            f"stage {spec.stage}: {ARCHITECTURE} supports selection policies only (divprune, random, "
            "vision-score): Qwen3-VL's DeepStack features belong to original tokens, not to merged ones"
        )
    return spec


class PrunewareQwen3VLProcessingInfo(PrunedQwenInfo, Qwen3VLProcessingInfo):
    ARCHITECTURE = ARCHITECTURE

    @classmethod
    def spec_for(cls, hf_config: Any, mm_config: Any) -> PruneSpec:
        return _spec(hf_config, mm_config)


class PrunewareQwen3VLMultiModalProcessor(Qwen3VLMultiModalProcessor):
    """Emits the pruned number of placeholders per image and per video frame."""

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, Any],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        info: PrunewareQwen3VLProcessingInfo = self.info  # type: ignore[assignment]
        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
        hf_processor = info.get_hf_processor(**hf_processor_mm_kwargs)
        config = info.get_hf_config()
        merge = config.vision_config.spatial_merge_size

        def image(item_idx: int) -> list[int]:
            _, height, width = map(int, out_mm_kwargs["image"][item_idx]["image_grid_thw"].data)
            return [hf_processor.image_token_id] * info.pruneware.item_tokens(1, height // merge, width // merge)

        def video(item_idx: int):
            item = out_mm_kwargs["video"][item_idx]
            frames, height, width = map(int, item["video_grid_thw"].data)
            count = info.pruneware.frame(height // merge, width // merge).count
            return Qwen3VLMultiModalProcessor.get_video_repl(
                tokens_per_frame=[count] * frames, timestamps=item["timestamps"].data,
                tokenizer=info.get_tokenizer(), vision_start_token_id=config.vision_start_token_id,
                vision_end_token_id=config.vision_end_token_id, video_token_id=config.video_token_id,
                select_token_id=True,
            )

        replace_with = {"image": image, "video": video}
        return [PromptReplacement(u.modality, u.target, replace_with[u.modality]) for u in updates]


@MULTIMODAL_REGISTRY.register_processor(
    PrunewareQwen3VLMultiModalProcessor,
    info=PrunewareQwen3VLProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class PrunewareQwen3VLForConditionalGeneration(PrunedQwenModel, Qwen3VLForConditionalGeneration):
    """Qwen3-VL whose image and video rows (main and DeepStack channels) are pruned per frame."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "model") -> None:
        spec = _spec(vllm_config.model_config.hf_config, vllm_config.model_config.multimodal_config)
        refuse_tower_lora(vllm_config, ARCHITECTURE)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.pruneware = spec

    def embed_multimodal(self, **kwargs: object) -> tuple[torch.Tensor, ...] | list:
        """One tensor per item: [T*k, visual_dim * (1 + deepstack levels) + OFFSET_CHANNELS],
        frame by frame, each kept row with its (0, row, col) in its frame (`positions`)."""
        by_modality = self._parse_and_validate_multimodal_inputs(**kwargs)
        merge = self.visual.spatial_merge_size
        compact = self.pruneware.stage.positions == "compact"
        out: list[torch.Tensor] = []
        for modality, item_input in by_modality.items():
            if item_input is None:
                continue
            process = self._process_image_input if modality == "image" else self._process_video_input
            for item, (frames, height, width) in zip(
                process(item_input), item_input[f"{modality}_grid_thw"].tolist(), strict=True
            ):
                grid = (frames, height // merge, width // merge)
                _, keep = prune_item(self.pruneware, item[:, : self.visual_dim], grid)  # scores the main channels
                offsets = kept_offsets(torch.zeros_like(keep) if compact else keep, *grid[1:], one_axis=False)
                out.append(attach_offsets(item[keep], offsets))
        return tuple(out) if out else []

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[torch.Tensor, int]:
        """[3, L] positions and the decode delta: one block per image or video frame."""
        config = self.config
        # vLLM yields an image's full grid size as its token count; its placeholders are the span
        images = {f.mm_position.offset: f.mm_position.length for f in mm_features if f.modality == "image"}
        blocks = []
        for offset, rows, cols, placeholders in self._iter_mm_grid_hw(
            input_tokens, mm_features, video_token_id=config.video_token_id,
            vision_start_token_id=config.vision_start_token_id, vision_end_token_id=config.vision_end_token_id,
            spatial_merge_size=config.vision_config.spatial_merge_size,
        ):
            count = self.pruneware.frame(rows, cols).count
            placeholders = images.get(offset, placeholders)
            if placeholders != count:
                raise RuntimeError(
                    f"frame at offset {offset} has {placeholders} placeholders, but the plan "
                    f"{self.pruneware.stage} keeps {count}: the prompt was processed with another plan"
                )
            blocks.append(ItemBlock(offset, np.zeros((3, count), dtype=np.int64), grid_extent(1, rows, cols, 1.0)))
        return request_positions(len(input_tokens), blocks, self.pruneware.stage.positions == "compact")
