"""Sessions leave nothing behind: hooks, attention implementation and registries are restored."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface

import pruneware
from tests.tiny import llava_inputs, qwen_inputs, tiny_llava, tiny_qwen


def fingerprint(model) -> dict:
    """Everything a session may touch."""
    return {
        "hooks": sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()),
        "attn": (
            model.config._attn_implementation,
            model.config.get_text_config()._attn_implementation,
            model.config.vision_config._attn_implementation,
        ),
        "attention_registry": sorted(AttentionInterface._global_mapping),
        "mask_registry": sorted(AttentionMaskInterface._global_mapping),
    }


@pytest.fixture(params=["llava", "qwen"])
def setup(request):
    if request.param == "llava":
        model = tiny_llava()
        return model, llava_inputs(model, [(3, 1, 4)])
    model = tiny_qwen()
    return model, qwen_inputs(model, [(3, [(8, 8)], 4)])


@pytest.mark.parametrize(
    ("plan", "error", "match"),
    [
        ("nosuch@2:0.5", pruneware.PlanError, r"valid policies: adaptinfer, .*crosslmm, .*divprune, .*fastv, .*random, .*vision-score"),
        ("random@6:0.5", pruneware.PlanError, r"model has 6 decoder layers: use 'pre' or a layer in 0..5"),
        ("random@2:0.0", pruneware.PlanError, r"ratio must be in \(0, 1\]"),
        ("random@2:1.01", pruneware.PlanError, r"ratio must be in \(0, 1\]"),
        ("random@@2", pruneware.PlanError, "malformed stage"),
        ("fastv@pre:0.5", pruneware.PlanError, "cannot run at 'pre'; give a layer K >= 1"),
        ("fastv@0:0.5", pruneware.PlanError, "use K >= 1"),
        ("nosuch", pruneware.PlanError, "malformed stage"),
    ],
)
def test_bad_plans_fail_before_touching_the_model(setup, plan, error, match):
    model, inputs = setup
    expected = model(**inputs).logits  # the first forward installs transformers' own capture hooks
    before = fingerprint(model)
    with pytest.raises(error, match=match):
        with pruneware.prune(model, plan):
            pass
    assert fingerprint(model) == before
    assert torch.equal(model(**inputs).logits, expected)


def test_unsupported_model_lists_supported_types():
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    with pytest.raises(TypeError, match=r"does not support LlamaForCausalLM.*supported model types: .*llava.*qwen2_5_vl"):
        pruneware.prune(LlamaForCausalLM(config), "random@1:0.5")


def test_exception_inside_the_block_removes_everything(setup):
    model, inputs = setup
    expected = model(**inputs).logits  # the first forward installs transformers' own capture hooks
    before = fingerprint(model)
    with pytest.raises(KeyError, match="boom"):
        with pruneware.prune(model, "divprune@pre:0.5,fastv@2:0.5"):
            assert fingerprint(model)["attn"] != before["attn"]  # the capture is installed
            model(**inputs)
            raise KeyError("boom")
    assert fingerprint(model) == before
    assert torch.equal(model(**inputs).logits, expected)


def test_error_inside_a_forward_leaves_the_session_removable(setup):
    model, inputs = setup
    model(**inputs)
    before = fingerprint(model)
    with pytest.raises(ValueError, match="pass input_ids, not inputs_embeds"):
        with pruneware.prune(model, "random@2:0.5"):
            embeds = model.get_input_embeddings()(inputs["input_ids"])
            model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
    assert fingerprint(model) == before


def test_attach_and_detach(setup):
    model, inputs = setup
    expected = model(**inputs).logits  # the first forward installs transformers' own capture hooks
    before = fingerprint(model)
    session = pruneware.attach(model, "fastv@2:0.25")
    with pytest.raises(RuntimeError, match="already has a pruneware session"):
        pruneware.attach(model, "random@2:0.5")
    pruned = model(**inputs).logits
    assert pruned.shape[1] < expected.shape[1]
    assert session.report.stages[0].n_after[0] < session.report.stages[0].n_before[0]
    pruneware.detach(model)
    assert fingerprint(model) == before
    assert torch.equal(model(**inputs).logits, expected)
    with pytest.raises(RuntimeError, match="no pruneware session is attached"):
        pruneware.detach(model)


def test_report_counts_layers_and_flops():
    model = tiny_llava(layers=6)
    inputs = llava_inputs(model, [(3, 1, 4)])
    with pruneware.prune(model, "divprune@pre:8,random@3:4") as run:
        model(**inputs)
    report = run.report
    assert [s.where for s in report.stages] == ["pre", 3]
    assert [s.n_after for s in report.stages] == [[8], [4]]
    assert report.visual_per_layer == [8, 8, 8, 4, 4, 4]
    assert report.avg_visual_tokens == 6
    assert all(torch.isin(report.stages[1].kept[0], report.stages[0].kept[0]))
    assert 0 < report.lm_flops < report.lm_flops_unpruned


def test_import_patches_nothing():
    code = """
import torch, transformers
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
import torch.nn.modules.module as M
def snap():
    return (dict(AttentionInterface._global_mapping), dict(AttentionMaskInterface._global_mapping),
            len(M._global_forward_pre_hooks), len(M._global_forward_hooks),
            torch.nn.Module.__call__, transformers.LlavaForConditionalGeneration.forward,
            transformers.Qwen2_5_VLForConditionalGeneration.forward, torch.nn.functional.scaled_dot_product_attention)
before = snap()
import pruneware, pruneware.engine.session, pruneware.engine.attention_capture, pruneware.policies, pruneware.adapters
assert snap() == before, "importing pruneware changed global state"
import sys
assert "matplotlib" not in sys.modules, "the core engine imported plotting"
print("clean")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "clean" in result.stdout
