"""The one tiny-config factory: every family builds, and the embedded models' configs are what it
makes (their shipped weights load against exactly these configs)."""

from __future__ import annotations

import json

import pytest

from pruneware.models import WEIGHTS_DIR
from pruneware.models.build import SHIPPED_VISION, build_config
from pruneware.models.serving_layout import to_serving_layout
from pruneware.models.tiny_configs import FAMILIES, mrope_section, tiny_config


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_builds_with_shared_sizes(family):
    config = tiny_config(family, layers=3, hidden=64, heads=4, ids={"image": 80})
    text = config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads) == (3, 64, 4)
    assert getattr(config, "image_token_id", getattr(config, "image_token_index", None)) == 80
    if family.startswith("qwen"):
        assert sum(text.rope_parameters["mrope_section"]) == 64 // 4 // 2


def test_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match="valid families: llava, llava-next"):
        tiny_config("gemma3")
    with pytest.raises(ValueError, match="mrope="):
        mrope_section(24)
    assert mrope_section(128) == [16, 24, 24]


@pytest.mark.parametrize("name, arch, vision", [
    ("tiny-llava", "llava", SHIPPED_VISION["llava"]),  # trained with a wider vision tower
    ("tiny-qwen2.5-vl", "qwen2.5-vl", SHIPPED_VISION["qwen2.5-vl"]),  # 7-px patches at 336 px: 576 tokens
])
def test_embedded_model_configs_are_unchanged(name, arch, vision):
    shipped = json.loads((WEIGHTS_DIR / name / "config.json").read_text())
    config = build_config(arch, vision=vision)
    to_serving_layout({}, config)  # shipped in the layout vLLM serves (pruneware.models.serving_layout)
    built = json.loads(config.to_json_string())
    for key in ("architectures", "dtype", "transformers_version"):
        shipped.pop(key, None), built.pop(key, None)
    assert built == shipped
