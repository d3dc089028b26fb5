"""`adaptinfer` keeps exactly what the official AdaptInfer code keeps (tests/official.py).

The official selection is rebuilt per sample, alone and unpadded, from transformers' eager
attention probabilities in a plain layer loop. pruneware runs the same samples as one
left-padded batch (text before and after the image, images of different sizes), under eager
and sdpa, with the reference and the Triton score kernels, over three stages, a last stage of
0 included. Every stage's kept set must be identical.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch

import pruneware
from pruneware.kernels import dispatch
from tests.official import llava_k, official_kept, qwen_k
from tests.reference import pad_batch
from tests.tiny import IMAGE_TOKEN, llava_inputs, qwen_media_inputs, tiny_llava, tiny_qwen2_vl

PRUNING_LOC = [1, 3, 5]  # official layer indices: attention read in L, L's output pruned
LLAVA_COUNTS = {"like-64": [30, 12, 3], "like-32": [20, 6, 0]}  # 64 visual tokens per image
QWEN_RATIOS = {"retained-10": [0.17, 0.6, 0.3], "retained-30": [0.5, 0.6, 0.3]}
SHARPEN = 6.0  # random weights attend almost uniformly, where every rule agrees


def sharpen(model):
    """Scale q and k so attention logits grow SHARPEN**2-fold: peaked, like a trained model's."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(SHARPEN)
            layer.self_attn.k_proj.weight.mul_(SHARPEN)
    return model


@cache
def llava_case():
    model = sharpen(tiny_llava("eager", layers=8, image_size=112))
    samples = [llava_inputs(model, [(5, 1, 9)], seed=1), llava_inputs(model, [(12, 1, 4)], seed=2)]
    return model, samples


@cache
def qwen_case():
    model = sharpen(tiny_qwen2_vl("eager", layers=8))
    samples = [
        qwen_media_inputs(model, [[5, ("image", 16, 16), 9]], seed=1),
        qwen_media_inputs(model, [[12, ("image", 8, 16), 4]], seed=2),
    ]
    return model, samples


def run_batch(model, samples, plan: str, backend: str) -> list[list[torch.Tensor]]:
    """pruneware on the left-padded batch: per stage, per sample, kept positions in the sample alone."""
    batch = pad_batch(samples)
    pads = (batch["attention_mask"] == 0).sum(dim=1).tolist()
    model.set_attn_implementation(backend)
    try:
        with pruneware.prune(model, plan) as run, torch.no_grad():
            model(**batch)
    finally:
        model.set_attn_implementation("eager")
    return [[kept - pad for kept, pad in zip(stage.kept, pads, strict=True)] for stage in run.report.stages]


def assert_same_kept(ours: list[list[torch.Tensor]], official: list[list[torch.Tensor]]) -> None:
    for b, per_sample in enumerate(official):
        for stage, want in enumerate(per_sample):
            got = ours[stage][b]
            assert torch.equal(got, want.sort().values), f"sample {b}, stage {stage}: {got.tolist()} != {want.tolist()}"


@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("schedule", list(LLAVA_COUNTS))
def test_llava_matches_the_official_code(schedule, backend, kernels, monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, kernels)
    counts = LLAVA_COUNTS[schedule]
    model, samples = llava_case()
    official = [official_kept(model, s, PRUNING_LOC, llava_k(counts), compact=True) for s in samples]
    plan = ",".join(f"adaptinfer@{layer + 1}:{c}:compact" for layer, c in zip(PRUNING_LOC, counts, strict=True))
    ours = run_batch(model, samples, plan, backend)
    assert [k.numel() for k in official[0]] == counts  # the rebuilt rule ran every stage
    assert_same_kept(ours, official)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("schedule", list(QWEN_RATIOS))
def test_qwen2_vl_matches_the_official_code(schedule, backend):
    ratios = QWEN_RATIOS[schedule]
    model, samples = qwen_case()
    official = [official_kept(model, s, PRUNING_LOC, qwen_k(ratios), compact=False) for s in samples]
    plan = ",".join(f"adaptinfer@{layer + 1}:*{r}" for layer, r in zip(PRUNING_LOC, ratios, strict=True))
    ours = run_batch(model, samples, plan, backend)
    assert_same_kept(ours, official)


def test_the_old_reading_would_fail_this_comparison():
    """All text rows and a head-summed prior (pruneware before issue 15) pick other tokens here,
    so the comparison above can tell the two rules apart."""
    model, samples = llava_case()
    ids = samples[1]["input_ids"][0]
    with torch.no_grad():
        attn = model(**samples[1], output_attentions=True).attentions[PRUNING_LOC[0]][0]  # [H, L, L]
    visual = (ids == IMAGE_TOKEN).nonzero().squeeze(1)
    text = (ids != IMAGE_TOKEN).nonzero().squeeze(1)
    t = attn[:, text][:, :, text].sum(0)
    prior = (t + t.T - torch.diag(torch.diag(t))).sum(0)
    old = visual[(prior[None, :, None] * attn[:, text][:, :, visual]).sum((0, 1)).topk(30).indices].sort().values
    official = official_kept(model, samples[1], PRUNING_LOC, llava_k(LLAVA_COUNTS["like-64"]), compact=True)[0]
    assert not torch.equal(old, official.sort().values)


def test_a_last_stage_of_zero_generates():
    model, samples = llava_case()
    batch = pad_batch(samples)
    with pruneware.prune(model, "adaptinfer@2:20:compact,adaptinfer@4:6:compact,adaptinfer@6:0:compact") as run:
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)
    assert [k.numel() for k in run.report.stages[-1].kept] == [0, 0]
    # 64 tokens before layer 2, 20 until 4, 6 until 6, then none: the true average over 8 layers.
    assert run.report.avg_visual_tokens == pytest.approx((64 * 2 + 20 * 2 + 6 * 2) / 8)


@pytest.mark.parametrize("ratio", [0.25, 0.1])
def test_divprune_matches_the_official_code(ratio):
    """DivPrune's official `DivPrune` on the projected visual tokens of each sample alone."""
    from tests.official import official_divprune
    from tests.reference import record_lm_inputs

    model, samples = llava_case()
    official = []
    for sample in samples:
        visual = (sample["input_ids"][0] == IMAGE_TOKEN).nonzero().squeeze(1)
        embeds = record_lm_inputs(model, sample)["embeds"][0, visual]
        official.append([visual[official_divprune(embeds, ratio)]])
    ours = run_batch(model, samples, f"divprune@pre:{ratio}:compact", "sdpa")
    assert_same_kept(ours, official)
