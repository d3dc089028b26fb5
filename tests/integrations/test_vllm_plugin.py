"""The vLLM plugin's registration, selection and refusals, against the real vllm package (CPU).

Install vllm with `.ci/install_vllm.sh`; without it these tests are skipped.
"""

from __future__ import annotations

import logging
import os

import pytest

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # before vllm picks its platform
pytest.importorskip("vllm", reason="vllm is not importable: run .ci/install_vllm.sh to install it")

from vllm.model_executor.model_loader import get_model_architecture  # noqa: E402
from vllm.model_executor.models import ModelRegistry  # noqa: E402
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402
from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_plugins_by_group  # noqa: E402

import pruneware.integrations.vllm as plugin  # noqa: E402
from pruneware.integrations.vllm.spec import spec_from_config  # noqa: E402
from pruneware.integrations.vllm.tiny import model_config, write_tiny_llava, write_tiny_qwen  # noqa: E402
from pruneware.plans import PlanError  # noqa: E402

LLAVA = "PrunewareLlavaForConditionalGeneration"
QWEN = "PrunewareQwen2_5_VLForConditionalGeneration"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("vllm-tiny")
    return {"llava": write_tiny_llava(root / "llava"), "qwen": write_tiny_qwen(root / "qwen")}


@pytest.fixture
def registry(monkeypatch):
    """A clean environment and a ModelRegistry restored after the test."""
    from vllm.model_executor.model_loader import utils

    monkeypatch.delenv(plugin.ENV_PLAN, raising=False)
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    saved, saved_hooks = dict(ModelRegistry.models), dict(MODELS_CONFIG_MAP)
    utils._MODEL_ARCH_BY_HASH.clear()  # vLLM memoises model dir -> class per process
    yield ModelRegistry
    ModelRegistry.models.clear()
    ModelRegistry.models.update(saved)
    MODELS_CONFIG_MAP.clear()
    MODELS_CONFIG_MAP.update(saved_hooks)
    utils._MODEL_ARCH_BY_HASH.clear()


def _image():
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (84, 112, 3), dtype=np.uint8))


def _image_tokens(config, prompt: str) -> list[int]:
    processor = MULTIMODAL_REGISTRY.create_processor(config)
    out = processor(prompt, processor.info.parse_mm_data({"image": [_image()]}))
    return [p.length for p in out["mm_placeholders"]["image"]]


def test_entry_point_is_discovered_and_filtered_by_vllm_plugins(registry, monkeypatch):
    plugins = load_plugins_by_group(DEFAULT_PLUGINS_GROUP)
    assert plugins["pruneware"] is plugin.register
    monkeypatch.setenv("VLLM_PLUGINS", "pruneware")
    assert list(load_plugins_by_group(DEFAULT_PLUGINS_GROUP)) == ["pruneware"]
    monkeypatch.setenv("VLLM_PLUGINS", "lora_filesystem_resolver")
    assert "pruneware" not in load_plugins_by_group(DEFAULT_PLUGINS_GROUP)


def test_register_is_reentrant_and_lazy(registry):
    base = {name: registry.models[name] for name in plugin.ARCHITECTURES}
    plugin.register()
    pruned_names = [pruned for pruned, _ in plugin.ARCHITECTURES.values()]
    first = {name: registry.models[name] for name in pruned_names}
    plugin.register()
    assert {name: registry.models[name] for name in pruned_names} == first
    for name, (pruned, target) in plugin.ARCHITECTURES.items():
        module, cls = target.split(":")
        assert (first[pruned].module_name, first[pruned].class_name) == (module, cls)  # a lazy entry
        assert registry.models[name] == base[name]  # no env var: the base names are untouched


def test_without_overrides_nothing_changes(registry, tiny):
    from vllm.model_executor.models.llava import LlavaForConditionalGeneration, LlavaMultiModalProcessor
    from vllm.model_executor.models.qwen2_5_vl import (
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLMultiModalProcessor,
    )

    plugin.register()
    llava, qwen = model_config(tiny["llava"]), model_config(tiny["qwen"])
    assert get_model_architecture(llava)[0] is LlavaForConditionalGeneration
    assert get_model_architecture(qwen)[0] is Qwen2_5_VLForConditionalGeneration
    assert type(MULTIMODAL_REGISTRY.create_processor(llava)) is LlavaMultiModalProcessor
    assert type(MULTIMODAL_REGISTRY.create_processor(qwen)) is Qwen2_5_VLMultiModalProcessor
    assert _image_tokens(llava, "w1 <image> w2") == [36]  # 84 px / 14 = 6x6 patches
    assert _image_tokens(qwen, "w1 <|vision_start|><|image_pad|><|vision_end|> w2") == [12]  # 3x4 merged


def test_hf_overrides_select_the_pruned_variant(registry, tiny):
    from pruneware.integrations.vllm.llava import PrunewareLlavaForConditionalGeneration

    plugin.register()
    config = model_config(tiny["llava"], {"architectures": [LLAVA], "pruneware": {"plan": "random@pre:5", "seed": 3}})
    assert get_model_architecture(config)[0] is PrunewareLlavaForConditionalGeneration
    assert spec_from_config(config.hf_config, "1d").seed == 3
    assert _image_tokens(config, "w1 <image> w2") == [5]


def test_env_var_turns_on_pruning_for_base_architectures(registry, monkeypatch, tiny):
    from pruneware.integrations.vllm.qwen2_5_vl import PrunewareQwen2_5_VLForConditionalGeneration

    monkeypatch.setenv(plugin.ENV_PLAN, "divprune@pre:0.5")
    plugin.register()
    plugin.register()
    config = model_config(tiny["qwen"])  # no hf_overrides at all
    assert get_model_architecture(config)[0] is PrunewareQwen2_5_VLForConditionalGeneration
    assert _image_tokens(config, "w1 <|vision_start|><|image_pad|><|vision_end|> w2") == [6]
    # hf_overrides' plan wins over the variable
    config = model_config(tiny["qwen"], {"pruneware": {"plan": "random@pre:2"}})
    assert _image_tokens(config, "w1 <|vision_start|><|image_pad|><|vision_end|> w2") == [2]


@pytest.mark.parametrize("plan", ["adaptinfer@1:0.5", "divprune@pre:0.5,dart@1:0.2", "sparsevlm@1:64"])
def test_in_llm_stages_vllm_cannot_serve_are_refused(registry, tiny, plan):
    plugin.register()
    config = model_config(tiny["llava"], {"architectures": [LLAVA], "pruneware": {"plan": plan}})
    with pytest.raises(PlanError, match="other in-LLM stages .* run in the HF wrapper"):
        MULTIMODAL_REGISTRY.create_processor(config)


@pytest.mark.parametrize("plan", ["fastv@1:0.5", "divprune@pre:0.5,random@1:0.2", "random@1:64", "pdrop@1:0.5", "fastv", "random"])
def test_in_llm_stages_vllm_serves_build_their_processor(registry, tiny, plan):
    plugin.register()
    config = model_config(tiny["llava"], {"architectures": [LLAVA], "pruneware": {"plan": plan}})
    assert MULTIMODAL_REGISTRY.create_processor(config) is not None


def test_attention_policies_are_refused_pre_llm(registry, tiny):
    plugin.register()
    config = model_config(tiny["llava"], {"architectures": [LLAVA], "pruneware": {"plan": "fastv@pre:0.5"}})
    with pytest.raises(PlanError, match="attention rows.*crosslmm, divprune, random, vision-score"):
        MULTIMODAL_REGISTRY.create_processor(config)


def test_bad_options_and_missing_plan_are_clear(registry, tiny):
    plugin.register()
    config = model_config(tiny["llava"], {"architectures": [LLAVA]})
    with pytest.raises(PlanError, match="needs a plan.*PRUNEWARE_VLLM_PLAN"):
        MULTIMODAL_REGISTRY.create_processor(config)
    config = model_config(tiny["llava"], {"architectures": [LLAVA], "pruneware": {"plan": "random@pre:4", "budget": 3}})
    with pytest.raises(PlanError, match=r"unknown keys \['budget'\].*valid keys: \['plan', 'seed', 'avg_tokens'\]"):
        MULTIMODAL_REGISTRY.create_processor(config)
    config = model_config(tiny["qwen"], {"architectures": [QWEN], "pruneware": {"plan": "random@pre:4:compact"}})
    with pytest.raises(PlanError, match="compact.*M-RoPE"):
        MULTIMODAL_REGISTRY.create_processor(config)


def test_evs_video_pruning_is_refused(registry, tiny):
    plugin.register()
    config = model_config(
        tiny["qwen"], {"architectures": [QWEN], "pruneware": {"plan": "random@pre:4"}}, video_pruning_rate=0.5
    )
    with pytest.raises(ValueError, match="video_pruning_rate"):
        MULTIMODAL_REGISTRY.create_processor(config)


def test_old_vllm_versions_get_a_clear_message(registry, monkeypatch, caplog):
    for ok in ("0.32.0", "0.33.0", "0.33.1", "0.34.0.dev12+gabc", "1.0.0"):
        plugin.check_vllm_version(ok)
    with pytest.raises(plugin.VllmVersionError, match=r"needs vllm>=0.32 .*found vllm 0\.31\.1.*pip install"):
        plugin.check_vllm_version("0.31.1")

    monkeypatch.setattr(plugin, "installed_vllm_version", lambda: "0.31.0")
    calls = []
    monkeypatch.setattr(ModelRegistry, "register_model", lambda *args: calls.append(args))
    with caplog.at_level(logging.WARNING, logger="vllm.pruneware"):
        plugin.register()  # nobody asked for pruning: warn, register nothing, let vLLM start
    assert calls == [] and "found vllm 0.31.0" in caplog.text
    monkeypatch.setenv(plugin.ENV_PLAN, "divprune@pre:64")
    with pytest.raises(plugin.VllmVersionError, match="found vllm 0.31.0"):
        plugin.register()
