"""Pruned LLaVA for vLLM: `PrunewareLlavaForConditionalGeneration`.

A subclass of vLLM's LlavaForConditionalGeneration with its own multimodal processor: each
image's placeholder count is the stage's budget for the vision tower's (g x g) patch grid, and
`embed_multimodal` returns exactly those rows. Positions are those of the HF path (see
`positions`): each kept token at its original 1-D position and the text after the image where it
was, or consecutive positions under `compact`; they are served through vLLM's per-request M-RoPE
path with every rotary pair on one axis. Only CLIP/SigLIP towers (a fixed square grid) are
supported; Pixtral-HF is refused. A vision-side stage (`vitK`, `pre-vit`, CLIP only) runs the tower
layer by layer with the cut (`vit.ClipViTRunner`); its kept patches are placed the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property

import torch
from transformers import PixtralVisionConfig

from pruneware.integrations.vllm import check_vllm_version

check_vllm_version()  # before the vllm imports below, which older versions lack

import numpy as np
from vllm.config import VllmConfig
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.model_executor.models.interfaces import SupportsMRoPE
from vllm.multimodal.inputs import MultiModalFeatureSpec, MultiModalKwargsItems
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import InputProcessingContext, PromptReplacement, PromptUpdate

from pruneware.integrations.vllm.positions import (
    ItemBlock,
    PositionOffsets,
    attach_offsets,
    kept_offsets,
    request_positions,
)
from pruneware.integrations.vllm.deep_layers import install_deep_layers
from pruneware.integrations.vllm.prune import deep_levels, prune_item
from pruneware.integrations.vllm.spec import PruneSpec, refuse_tower_lora, require_spec, square_grid
from pruneware.integrations.vllm.vit import ClipViTRunner, pixel_keep_count
from pruneware.plans.plan import PlanError

ARCHITECTURE = "PrunewareLlavaForConditionalGeneration"


def _refuse_pixtral(config) -> None:
    if isinstance(config.vision_config, PixtralVisionConfig):
        raise ValueError(
            f"{ARCHITECTURE} supports CLIP and SigLIP vision towers (a fixed square patch grid); "
            "Pixtral-HF has variable grids with break tokens. Unset PRUNEWARE_VLLM_PLAN or drop the "
            "pruned architecture for this model."
        )


class PrunewareLlavaProcessingInfo(LlavaProcessingInfo):
    """LLaVA processing info whose image token count is the pruned one (prompts and profiling)."""

    def __init__(self, ctx: InputProcessingContext) -> None:
        super().__init__(ctx)
        self.pruneware  # noqa: B018  (a bad plan fails when the processor is built, not per request)

    @cached_property
    def pruneware(self) -> PruneSpec:
        config = self.get_hf_config()
        _refuse_pixtral(config)
        return require_spec(config, ARCHITECTURE, "1d")

    def pruned_tokens(self, n: int) -> int:
        """Tokens kept from an image of `n` tokens."""
        return self.pruneware.item_tokens(1, *square_grid(n))

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        full = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return self.pruned_tokens(full)


class PrunewareLlavaMultiModalProcessor(LlavaMultiModalProcessor):
    """Emits the pruned number of `<image>` placeholders, for pixel and embedding inputs."""

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        info: PrunewareLlavaProcessingInfo = self.info  # type: ignore[assignment]
        image_token_id = info.get_hf_config().image_token_index

        def replacement(item_idx: int) -> list[int]:
            images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
            if isinstance(images, ImageEmbeddingItems):
                count = info.pruned_tokens(images.get_feature_size(item_idx))
            else:
                size = images.get_image_size(item_idx)
                count = info.get_num_image_tokens(image_width=size.width, image_height=size.height)
                if info.pruneware.stage.where == "pre-vit":  # a pre-vit policy may keep fewer (pixelprune)
                    vision = info.get_hf_config().vision_config
                    pixels = out_mm_kwargs["image"][item_idx]["pixel_values"].data[None]
                    side = vision.image_size // vision.patch_size
                    count = pixel_keep_count(info.pruneware, pixels, (1, side, side), vision.patch_size)
            return [image_token_id] * count

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)]


def _build_info(ctx: InputProcessingContext) -> PrunewareLlavaProcessingInfo:
    return PrunewareLlavaProcessingInfo(ctx)


@MULTIMODAL_REGISTRY.register_processor(
    PrunewareLlavaMultiModalProcessor, info=_build_info, dummy_inputs=LlavaDummyInputsBuilder
)
class PrunewareLlavaForConditionalGeneration(PositionOffsets, LlavaForConditionalGeneration, SupportsMRoPE):
    """LLaVA whose image embeddings are pruned (or pooled) before the language model."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        _refuse_pixtral(config)
        spec = require_spec(config, ARCHITECTURE, "1d")  # fail before building any weights
        refuse_tower_lora(vllm_config, ARCHITECTURE)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.pruneware = spec
        vision = config.vision_config
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        # Tokens of an unpruned image: the span the text after it skips in the HF path.
        self.full_image_tokens = (vision.image_size // vision.patch_size) ** 2 + (strategy == "full")
        self.deep_layers = install_deep_layers(self, spec, vllm_config, ARCHITECTURE)
        self.vit = None
        if spec.stage.in_vision:  # the tower runs block by block, cut before block K (`vit`)
            # the HF session's range; vLLM loads the layers up to the feature layer, and a cut after it
            # (K == their count) reads the kept rows of the feature layer, as the HF session does
            depth = min(config.vision_config.num_hidden_layers, len(self.vision_tower.vision_model.encoder.layers) + 1)
            if spec.stage.vit_block >= depth:
                raise PlanError(f"stage {spec.stage} prunes before vision layer {spec.stage.vit_block}, but the vision "
                                f"tower runs {depth} layers here: use vit0..vit{depth - 1}, or 'pre-vit'")
            self.vit = ClipViTRunner(config, self.vision_tower, self.multi_modal_projector, spec)

    def embed_multimodal(self, **kwargs: object) -> tuple[torch.Tensor, ...] | list:
        """One tensor per image: [k, D + OFFSET_CHANNELS], the kept rows in original order (or
        the pooled rows), each with its original index within the image (`positions`)."""
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if self.vit is not None:
            return self._embed_vit(image_input)
        if image_input["type"] == "image_embeds":
            embeds, vision = image_input["data"], None
        else:
            vision = self._process_image_pixels(image_input)  # [bn, n, C]
            embeds = self.multi_modal_projector(vision)  # [bn, n, D]
        out = []
        for i, item in enumerate(embeds):
            grid = (1, *square_grid(item.shape[0]))
            rows, keep = prune_item(self.pruneware, item, grid, None if vision is None else vision[i])
            if self.pruneware.stage.positions == "compact":
                keep = torch.zeros_like(keep)
            levels = deep_levels(self.pruneware, rows.shape[0], item.shape[0], rows.device)
            offsets = kept_offsets(keep, *grid[1:], one_axis=True)
            out.append(attach_offsets(rows, offsets, levels, original=item.shape[0]))
        return tuple(out)

    def _embed_vit(self, image_input) -> tuple[torch.Tensor, ...]:
        """embed_multimodal for a vision-side stage: the tower keeps the units (see `vit`)."""
        if image_input["type"] == "image_embeds":
            raise ValueError(f"stage {self.pruneware.stage} runs inside the vision tower: send images, not image embeddings")
        out = []
        for rows, keep in self.vit.run(image_input["pixel_values"]):
            offsets = kept_offsets(keep, 1, self.full_image_tokens, one_axis=True)
            if self.pruneware.stage.positions == "compact":
                offsets = torch.zeros_like(offsets)
            out.append(attach_offsets(rows, offsets, None, original=self.full_image_tokens))
        return tuple(out)

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[torch.Tensor, int]:
        """[3, L] positions (three equal rows) and the decode delta: every image spans its full
        token count; its slots sit at its start until `forward` adds each kept token's index."""
        blocks = [
            ItemBlock(f.mm_position.offset, np.zeros((3, f.mm_position.length), dtype=np.int64), self.full_image_tokens)
            for f in mm_features
        ]
        return request_positions(len(input_tokens), blocks, self.pruneware.stage.positions == "compact")
