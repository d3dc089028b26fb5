"""FastV and AdaptInfer pick exactly what a hand computation on eager attention weights picks."""

from __future__ import annotations

import pytest
import torch

import pruneware
from pruneware.plans.presets import get_preset
from tests.tiny import IMAGE_TOKEN, llava_inputs, qwen_inputs, tiny_llava, tiny_qwen


def model_and_inputs(family: str, attn: str = "eager"):
    if family == "llava":
        model = tiny_llava(attn)
        return model, llava_inputs(model, [(5, 1, 9)])
    model = tiny_qwen(attn)
    return model, qwen_inputs(model, [(4, [(8, 12)], 9)])


def eager_attention(model, inputs, layer: int) -> torch.Tensor:
    """[H, L, L] attention probabilities of one sample at `layer`, from transformers' eager path."""
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    return out.attentions[layer][0]


def by_hand(attn: torch.Tensor, input_ids: torch.Tensor, k: int, policy: str) -> torch.Tensor:
    visual = (input_ids == IMAGE_TOKEN).nonzero().squeeze(1)
    text = (input_ids != IMAGE_TOKEN).nonzero().squeeze(1)
    if policy == "fastv":
        score = attn[:, -1, visual].sum(0)
    else:  # official AdaptInfer: post-image text rows, a prior per head
        after = text[text > visual.max()]
        t = attn[:, after][:, :, after]  # [H, T, T]
        prior = (t + t.transpose(1, 2) - torch.diag_embed(torch.diagonal(t, dim1=1, dim2=2))).sum(1)  # [H, T]
        score = (prior[:, :, None] * attn[:, after][:, :, visual]).sum((0, 1))
    return visual[score.topk(k).indices].sort().values


@pytest.mark.parametrize("family", ["llava", "qwen"])
@pytest.mark.parametrize("policy", ["fastv", "adaptinfer"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_selection_matches_hand_computation(family, policy, backend):
    model, inputs = model_and_inputs(family, "eager")
    expected = by_hand(eager_attention(model, inputs, 2), inputs["input_ids"][0], 7, policy)
    model.set_attn_implementation(backend)
    with pruneware.prune(model, f"{policy}@3:7") as run:
        with torch.no_grad():
            model(**inputs)
    assert torch.equal(run.report.stages[0].kept[0], expected)


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_fastv_is_adaptinfer_with_the_weight_on_the_last_token(family):
    model, inputs = model_and_inputs(family, "sdpa")
    results = []
    for plan in ("fastv@2:0.3,fastv@4:0.1", "adaptinfer[prior=last]@2:0.3,adaptinfer[prior=last]@4:0.1"):
        with pruneware.prune(model, plan) as run:
            with torch.no_grad():
                logits = model(**inputs).logits
        results.append((logits, [s.kept[0] for s in run.report.stages]))
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))
    assert torch.equal(results[0][0], results[1][0])


def test_bad_policy_parameter_names_the_options():
    with pytest.raises(pruneware.PlanError, match=r"prior must be one of \('text', 'last'\)"):
        pruneware.prune(tiny_llava(), "adaptinfer[prior=first]@2:0.5")


def test_adaptinfer_preset_follows_the_official_layers_counts_and_positions():
    # LLaVA-1.5 (32 layers): attention read in layers 1, 10, 20, their outputs pruned.
    plan = get_preset("adaptinfer").build(32)
    assert [s.where for s in plan.stages] == [2, 11, 21]
    assert plan.keep_counts(576) == [133, 27, 3] and {s.positions for s in plan.stages} == {"compact"}
    assert plan.avg_visual_tokens(576, 32) == 82.875  # the paper's "64"
    # avg_tokens means the true average.
    solved = get_preset("adaptinfer").build(32, avg_tokens=64, n_visual=576)
    assert [s.where for s in solved.stages] == [2, 11, 21]
    assert abs(solved.avg_visual_tokens(576, 32) - 64) < 1
    # Qwen2-VL (28 layers): layers 0, 9, 19 -> stages before 1, 10, 20, ratios of the tokens left.
    qwen = get_preset("adaptinfer").build(28, rope="mrope")
    assert str(qwen) == "adaptinfer@1:*0.17,adaptinfer@10:*0.6,adaptinfer@20:*0.3"


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_adaptinfer_preset_with_avg_tokens_runs_and_hits_the_average(family):
    model, inputs = model_and_inputs(family, "sdpa")
    n_visual = int((inputs["input_ids"] == IMAGE_TOKEN).sum())
    with pruneware.prune(model, "adaptinfer", avg_tokens=n_visual / 4) as run:
        with torch.no_grad():
            model(**inputs)
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
    rope = "1d" if family == "llava" else "mrope"
    assert [s.where for s in run.report.stages] == get_preset("adaptinfer").layers(6, rope)
    assert abs(run.report.avg_visual_tokens - n_visual / 4) <= 1
