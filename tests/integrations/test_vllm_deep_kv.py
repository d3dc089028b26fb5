"""KV-cache accounting of in-LLM stages without an engine: how many tokens an item loses at each
level (the HF session's counts), what `DeepLevelSpec` reads from a request's multimodal features,
and that vLLM keeps the spec out of the full-attention group. The engine's own block counts are
checked in `serving/test_kv_accounting.py`."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # before vllm picks its platform (the other vLLM test files rely on it)
pytest.importorskip("vllm")

from vllm.multimodal.inputs import PlaceholderRange  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, UniformTypeKVCacheSpecs  # noqa: E402
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry  # noqa: E402

from pruneware.integrations.vllm.deep_kv import DeepLevelManager, DeepLevelSpec, alive_counts  # noqa: E402
from pruneware.integrations.vllm.deep_layers import item_token_rule  # noqa: E402
from pruneware.integrations.vllm.prune import deep_levels  # noqa: E402
from pruneware.integrations.vllm.spec import spec_for  # noqa: E402
from pruneware.plans.plan import Stage  # noqa: E402

FULL = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=32, dtype=torch.float32)


@pytest.mark.parametrize("plan", ["random@4:0.25", "divprune@pre:0.5,random@4:0.25,random@6:0.1", "random@2:100,random@5:*0.5"])
@pytest.mark.parametrize("original", [576, 100, 7])
def test_alive_counts_match_the_tokens_the_random_draw_drops(plan, original):
    spec = spec_for(plan, 0, 8, "1d")
    kept = spec.stage.keep_count(original) if spec.pre_real else original
    levels = deep_levels(spec, kept, original)
    drawn = [int(((levels == 0) | (levels > i + 1)).sum()) for i in range(len(spec.deep))]
    assert alive_counts(spec.deep, kept, original) == drawn


def level_spec(level: int, stages: str, item_tokens: int = 0, merge: int = 2) -> DeepLevelSpec:
    return DeepLevelSpec.from_full(FULL, level, [Stage.parse(s) for s in stages.split(",")], item_tokens, merge)


def feature(offset: int, length: int, grid: tuple[int, int, int] | None):
    data = None if grid is None else {"image_grid_thw": SimpleNamespace(data=torch.tensor(grid))}
    return SimpleNamespace(mm_position=PlaceholderRange(offset=offset, length=length), data=data)


def test_absent_tokens_per_item_follow_the_grid_and_the_level():
    spec1, spec2 = level_spec(1, "fastv@2:0.5,pdrop@4:0.25"), level_spec(2, "fastv@2:0.5,pdrop@4:0.25")
    items = [feature(3, 576, (1, 48, 48)), feature(600, 64, (1, 16, 16)), feature(700, 10, None)]
    # 48 x 48 patches merged 2 x 2: 576 tokens; 16 x 16: 64. Level 1 keeps half, level 2 a quarter.
    assert spec1.absent(items) == [(579, 288), (664, 32)]
    assert spec2.absent(items) == [(579, 432), (664, 48)]  # the unknown item counts as present


def test_a_fixed_item_size_ignores_the_grid():
    spec = level_spec(1, "random@4:0.25", item_tokens=576, merge=1)
    assert spec.absent([feature(5, 144, None)]) == [(149, 0)]  # 144 placeholders left by a pre stage: 0.25 of 576
    assert spec.absent([feature(5, 576, None)]) == [(581, 432)]


def test_level_specs_stay_out_of_the_full_attention_group():
    specs = {"layers.0": FULL, "layers.1": FULL, "layers.2": level_spec(1, "random@2:0.5"), "layers.3": level_spec(1, "random@2:0.5")}
    with pytest.raises(AssertionError):  # vLLM's uniformity test: the first layer's spec merges all
        FullAttentionSpec.merge(list(specs.values()))
    assert UniformTypeKVCacheSpecs.from_specs(specs) is None
    assert level_spec(1, "random@2:0.5").page_size_bytes == FULL.page_size_bytes
    assert level_spec(1, "random@2:0.5") != level_spec(2, "random@2:0.5,random@4:0.25")
    assert KVCacheSpecRegistry.get_manager_class(level_spec(1, "random@2:0.5")) is DeepLevelManager


def test_item_token_rule_reads_the_vision_config():
    from pruneware.models.tiny_configs import tiny_config

    llava = tiny_config("llava")
    assert item_token_rule(llava) == ((llava.vision_config.image_size // llava.vision_config.patch_size) ** 2, 1)
    assert item_token_rule(tiny_config("llava", vision_feature_select_strategy="full"))[0] == item_token_rule(llava)[0] + 1
    assert item_token_rule(tiny_config("qwen2.5-vl")) == (0, tiny_config("qwen2.5-vl").vision_config.spatial_merge_size)
