"""Pruned LLaVA-NeXT for vLLM: `PrunewareLlavaNextForConditionalGeneration`.

An image's placeholder run is, as in pruneware's HF adapter (`adapters/llava_next.py`), the base
image (a side x side grid) then the anyres tiles stitched and unpadded into an h x w grid, each
row followed by the model's `image_newline`: `side*side + h*(w + 1)` tokens. The budget applies
to the image as the HF path applies it to a one-image sample: `stage.keep_count(side*side + h*w)`
tokens split between the two grids in proportion (`split_budget`, at least one each), selected
per grid; the h newline rows are always kept, like text. The processor emits that many
placeholders (prompts and profiling) and `embed_multimodal` returns exactly those rows, in
original order.

Positions are the HF path's: every kept token and newline keeps its original 1-D index in the
image, and the text after the image starts where it would after the full image; `compact`
re-indexes. They are served through vLLM's per-request M-RoPE path with every rotary pair on one
axis (`positions.OneAxisMRoPE`).

Refused, with a message: merging policies (crosslmm: the pooled grids of the two units would
not keep the placeholder count the processor promised), `vision_feature_select_strategy="full"`
(vLLM's LLaVA-NeXT itself requires "default"), and `image_embeds` inputs (no image size, so no
grid). Several images in one prompt each get their own budget (per image, as everywhere in vLLM).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property

import numpy as np
import torch

from pruneware.integrations.vllm import check_vllm_version

check_vllm_version()  # before the vllm imports below, which older versions lack

from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import SupportsMRoPE
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFeatureSpec, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import InputProcessingContext, PromptReplacement, PromptUpdate

from pruneware.errors import PlanError
from pruneware.integrations.vllm.positions import (
    ItemBlock,
    PositionOffsets,
    attach_offsets,
    kept_offsets,
    request_positions,
)
from pruneware.integrations.vllm.prune import item_input
from pruneware.integrations.vllm.spec import IN_LLM_FAMILIES, PruneSpec, refuse_in_llm, refuse_tower_lora, require_spec
from pruneware.policies.base import split_budget

ARCHITECTURE = "PrunewareLlavaNextForConditionalGeneration"


def _spec(config) -> PruneSpec:
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    if strategy != "default":
        raise ValueError(f"{ARCHITECTURE} supports vision_feature_select_strategy='default', not {strategy!r}")
    spec = require_spec(config, ARCHITECTURE, "1d")
    refuse_in_llm(spec, ARCHITECTURE, IN_LLM_FAMILIES)
    if spec.policy.needs.merges:
        raise PlanError(
            f"stage {spec.stage}: {ARCHITECTURE} supports selection policies only (divprune, random, "
            "vision-score): pooling LLaVA-NeXT's base and anyres grids is not mapped to placeholders in vLLM"
        )
    return spec


def anyres_grid(config, height: int, width: int) -> tuple[int, int, int]:
    """(side, h, w) of an image of `height` x `width` pixels: the base grid's side and the
    unpadded high-res grid, as transformers' and vLLM's `pack_image_features` lay them out."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    rows, cols = get_anyres_image_grid_shape((height, width), config.image_grid_pinpoints, vision.image_size)
    h, w = unpad_image(torch.empty(0, rows * side, cols * side), (height, width)).shape[1:]
    return side, int(h), int(w)


def kept_counts(spec: PruneSpec, side: int, h: int, w: int) -> list[int]:
    """Tokens kept from the base grid and from the high-res grid (newlines not counted)."""
    sizes = [side * side, h * w]
    return split_budget(sizes, spec.stage.keep_count(sum(sizes)))


def item_index(side: int, h: int, w: int) -> torch.Tensor:
    """[side*side + h*w] each visual token's index in the packed item (newlines skipped)."""
    high = torch.arange(h * w)
    return torch.cat([torch.arange(side * side), side * side + high // w * (w + 1) + high % w])


class PrunewareLlavaNextProcessingInfo(LlavaNextProcessingInfo):
    """LLaVA-NeXT processing info whose image token count is the pruned one."""

    def __init__(self, ctx: InputProcessingContext) -> None:
        super().__init__(ctx)
        self.pruneware  # noqa: B018  (a bad plan fails when the processor is built, not per request)

    @cached_property
    def pruneware(self) -> PruneSpec:
        return _spec(self.get_hf_config())

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        side, h, w = anyres_grid(self.get_hf_config(), image_height, image_width)
        return sum(kept_counts(self.pruneware, side, h, w)) + h


class PrunewareLlavaNextMultiModalProcessor(LlavaNextMultiModalProcessor):
    """Emits the pruned number of `<image>` placeholders (pixel inputs only)."""

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        info: PrunewareLlavaNextProcessingInfo = self.info  # type: ignore[assignment]
        image_token_id = info.get_hf_config().image_token_index

        def replacement(item_idx: int) -> list[int]:
            images = mm_items.get_items("image", ImageProcessorItems)
            if not isinstance(images, ImageProcessorItems):
                raise ValueError(f"{ARCHITECTURE} needs images, not image_embeds: the anyres grid comes from the image size")
            size = images.get_image_size(item_idx)
            return [image_token_id] * info.get_num_image_tokens(image_width=size.width, image_height=size.height)

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)]


@MULTIMODAL_REGISTRY.register_processor(
    PrunewareLlavaNextMultiModalProcessor, info=PrunewareLlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class PrunewareLlavaNextForConditionalGeneration(PositionOffsets, LlavaNextForConditionalGeneration, SupportsMRoPE):
    """LLaVA-NeXT whose base and anyres tokens are pruned before the language model."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        spec = _spec(vllm_config.model_config.hf_config)  # fail before building any weights
        refuse_tower_lora(vllm_config, ARCHITECTURE)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.pruneware = spec

    def prune_image(self, packed: torch.Tensor, side: int, h: int, w: int) -> torch.Tensor:
        """packed: [side*side + h*(w+1), D] one image's features as vLLM packs them.
        Returns [k, D + OFFSET_CHANNELS]: kept tokens and all newlines, in original order."""
        if packed.shape[0] != side * side + h * (w + 1):
            raise RuntimeError(f"image of grids {side}x{side} + {h}x{w} should pack {side * side + h * (w + 1)} rows, got {packed.shape[0]}")
        index = item_index(side, h, w).to(packed.device)
        visual = packed[index]
        stage = item_input(self.pruneware, visual, (1, 1, visual.shape[0]))
        stage.image_ids = torch.cat([torch.zeros(side * side), torch.ones(h * w)]).long()[None].to(packed.device)
        stage.grids = [[(side, side), (h, w)]]
        stage.sizes = [[side * side, h * w]] if h * w else [[side * side]]
        picked = self.pruneware.policy.select(stage, [sum(kept_counts(self.pruneware, side, h, w))])[0]
        newlines = side * side + torch.arange(1, h + 1, device=packed.device) * (w + 1) - 1
        keep = torch.cat([index[picked], newlines]).sort().values
        if self.pruneware.stage.positions == "compact":
            return attach_offsets(packed[keep], torch.zeros(len(keep), 3, dtype=torch.long, device=packed.device))
        return attach_offsets(packed[keep], kept_offsets(keep, 1, len(packed), one_axis=True))

    def embed_multimodal(self, **kwargs: object) -> tuple[torch.Tensor, ...] | list:
        """One tensor per image: its kept rows and newline rows with their original 1-D index."""
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] == "image_embeds":
            raise ValueError(f"{ARCHITECTURE} needs images, not image_embeds: the anyres grid comes from the image size")
        packed = self._process_image_input(image_input)
        sizes = image_input["image_sizes"].tolist()
        return tuple(self.prune_image(p, *anyres_grid(self.config, *s)) for p, s in zip(packed, sizes, strict=True))

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[torch.Tensor, int]:
        """[3, L] positions (three equal rows) and the decode delta: every image spans its full
        packed length; its slots sit at its start until `forward` adds each token's index."""
        blocks = []
        for f in mm_features:
            side, h, w = anyres_grid(self.config, *f.data["image_sizes"].data.tolist())
            blocks.append(ItemBlock(f.mm_position.offset, np.zeros((3, f.mm_position.length), dtype=np.int64),
                                    side * side + h * (w + 1)))
        return request_positions(len(input_tokens), blocks, self.pruneware.stage.positions == "compact")
