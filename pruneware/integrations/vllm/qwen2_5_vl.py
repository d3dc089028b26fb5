"""Pruned Qwen2.5-VL for vLLM: `PrunewareQwen2_5_VLForConditionalGeneration`.

Images and video frames keep a fixed number of tokens each (`PruneSpec.frame`); the processor,
`embed_multimodal` and the M-RoPE positions are the shared Qwen ones (`qwen_common`): kept tokens
at their original (t, row, col), with t = int(frame * second_per_grid_t * tokens_per_second);
pooled tokens on their pooled grid; `compact` numbers every token consecutively.
"""

from __future__ import annotations

from pruneware.integrations.vllm import check_vllm_version

check_vllm_version()  # before the vllm imports below, which older versions lack

from vllm.config import VllmConfig
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from pruneware.integrations.vllm.deep_layers import install_deep_layers
from pruneware.integrations.vllm.qwen_common import PrunedQwenInfo, PrunedQwenModel, PrunedQwenProcessor
from pruneware.integrations.vllm.spec import refuse_tower_lora
from pruneware.integrations.vllm.vit import QwenViTRunner
from pruneware.plans.plan import PlanError

ARCHITECTURE = "PrunewareQwen2_5_VLForConditionalGeneration"


class PrunewareQwen2_5_VLProcessingInfo(PrunedQwenInfo, Qwen2_5_VLProcessingInfo):
    ARCHITECTURE = ARCHITECTURE


class PrunewareQwen2_5_VLMultiModalProcessor(PrunedQwenProcessor, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    PrunewareQwen2_5_VLMultiModalProcessor,
    info=PrunewareQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class PrunewareQwen2_5_VLForConditionalGeneration(PrunedQwenModel, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL whose image and video embeddings are pruned (or pooled) per frame."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        model_config = vllm_config.model_config
        spec = PrunewareQwen2_5_VLProcessingInfo.spec_for(model_config.hf_config, model_config.multimodal_config)
        refuse_tower_lora(vllm_config, ARCHITECTURE)  # fail before building any weights
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.pruneware = spec
        self.deep_layers = install_deep_layers(self, spec, vllm_config, ARCHITECTURE)
        if spec.stage.in_vision:  # the tower runs block by block, cut before block K (`vit`)
            depth = len(self.visual.blocks)
            if spec.stage.vit_block >= depth:
                raise PlanError(f"stage {spec.stage} prunes before vision block {spec.stage.vit_block}, but the "
                                f"vision tower has {depth} blocks: use vit0..vit{depth - 1}, or 'pre-vit'")
            self.vit = QwenViTRunner(self.visual, spec)
