"""The serving layout (pruneware.models.serving_layout) is an exact re-parametrisation: a tiny
random model converted to head size 32 (and, for Qwen, a wider residual stream) gives the same
logits, unpruned and under a pruning plan, through transformers' own loader."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText

import pruneware
from pruneware.models.serving_layout import SERVING_HEAD_DIM, convert_checkpoint
from tests.tiny import llava_inputs, qwen_inputs, tiny_llava, tiny_qwen

CASES = {
    "llava": (lambda: tiny_llava(layers=4), lambda m: llava_inputs(m, [(3, 1, 4), (1, 1, 2)])),
    "qwen2.5-vl": (lambda: tiny_qwen(layers=4), lambda m: qwen_inputs(m, [(3, [(4, 6)], 4), (1, [(4, 4)], 2)])),
}


@pytest.mark.parametrize("family", sorted(CASES))
@pytest.mark.parametrize("plan", [None, "divprune@pre:0.5", "random@2:0.5"])
def test_converted_checkpoint_computes_the_same_logits(tmp_path, family, plan):
    build, inputs_for = CASES[family]
    model = build()
    model.save_pretrained(tmp_path)
    assert convert_checkpoint(tmp_path)
    assert not convert_checkpoint(tmp_path)  # idempotent: already in the layout
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["text_config"]["head_dim"] == SERVING_HEAD_DIM
    if family == "qwen2.5-vl":  # vLLM's Qwen2 reads its head size from the width
        assert config["text_config"]["hidden_size"] // config["text_config"]["num_attention_heads"] == SERVING_HEAD_DIM
    converted = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    inputs = inputs_for(model)
    with torch.inference_mode():
        logits = []
        for m in (model, converted):
            if plan is None:
                logits.append(m(**inputs).logits)
            else:
                with pruneware.prune(m, plan, seed=0):
                    logits.append(m(**inputs).logits)
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)


def test_vision_keys_are_in_the_hub_layout(tmp_path):
    from safetensors import safe_open

    tiny_llava(layers=2).save_pretrained(tmp_path)
    convert_checkpoint(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        vision = [k for k in f.keys() if k.startswith("vision_tower.")]
    assert vision and all(k.startswith("vision_tower.vision_model.") for k in vision)
