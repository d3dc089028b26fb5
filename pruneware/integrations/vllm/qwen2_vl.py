"""Pruned Qwen2-VL for vLLM: `PrunewareQwen2VLForConditionalGeneration`.

The same contract as the Qwen2.5-VL variant, from the shared Qwen mixins (`qwen_common`).
Qwen2-VL has no window attention and no `second_per_grid_ts`: frame t sits at temporal
position t (t_factor 1).
"""

from __future__ import annotations

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

from pruneware.integrations.vllm.deep_layers import install_deep_layers
from pruneware.integrations.vllm.qwen_common import PrunedQwenInfo, PrunedQwenModel, PrunedQwenProcessor
from pruneware.integrations.vllm.spec import refuse_tower_lora

ARCHITECTURE = "PrunewareQwen2VLForConditionalGeneration"


class PrunewareQwen2VLProcessingInfo(PrunedQwenInfo, Qwen2VLProcessingInfo):
    ARCHITECTURE = ARCHITECTURE


class PrunewareQwen2VLMultiModalProcessor(PrunedQwenProcessor, Qwen2VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    PrunewareQwen2VLMultiModalProcessor,
    info=PrunewareQwen2VLProcessingInfo,
    dummy_inputs=Qwen2VLDummyInputsBuilder,
)
class PrunewareQwen2VLForConditionalGeneration(PrunedQwenModel, Qwen2VLForConditionalGeneration):
    """Qwen2-VL whose image and video embeddings are pruned (or pooled) per frame."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        model_config = vllm_config.model_config
        spec = PrunewareQwen2VLProcessingInfo.spec_for(model_config.hf_config, model_config.multimodal_config)
        refuse_tower_lora(vllm_config, ARCHITECTURE)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.pruneware = spec
        self.deep_layers = install_deep_layers(self, spec, vllm_config, ARCHITECTURE)
