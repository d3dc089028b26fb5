"""Budgets per sample: `avg_tokens` is solved for each sample's own visual tokens, an
unreachable budget is refused before any layer runs, and a written budget is what runs."""

from __future__ import annotations

import pytest
import torch

import pruneware
from tests.reference import pad_batch
from tests.adapters.test_families import make
from tests.engine.test_equivalence import logits
from tests.tiny import llava_inputs, qwen_media_inputs, tiny_llava


@pytest.mark.parametrize(("family", "media"), [("qwen2_5_vl", "image"), ("qwen2_5_vl", "video"), ("llava_next", "image")])
@pytest.mark.parametrize("preset", ["info-horizon", "adaptinfer", "fastv", "crosslmm"])
def test_padded_batch_equals_samples_alone_under_avg_tokens(family, media, preset):
    model, _, samples = make(family, media)
    batch = pad_batch(samples)
    with pruneware.prune(model, preset, avg_tokens=10, seed=2) as run:
        batched = logits(model, batch)
        batched_gen = model.generate(**batch, max_new_tokens=3, do_sample=False)
        report = run.report
        for b, sample in enumerate(samples):
            alone = logits(model, sample)
            assert report.sample_plans[b] == run.report.plan  # this sample's own solved budgets
            offset = batch["input_ids"].shape[1] - sample["input_ids"].shape[1]
            for in_batch, own in zip(report.stages, run.report.stages, strict=True):
                assert in_batch.n_after[b] == own.n_after[0]
                assert torch.equal(in_batch.kept[b] - offset, own.kept[0])
            n = alone.shape[1]
            torch.testing.assert_close(batched[b, -n:], alone[0], atol=2e-5, rtol=1e-4)
            alone_gen = model.generate(**sample, max_new_tokens=3, do_sample=False)
            assert torch.equal(batched_gen[b, -3:], alone_gen[0, -3:])
    if preset != "crosslmm":  # a single `pre` stage keeps avg_tokens whatever the sample
        assert len(set(report.sample_plans)) > 1, report.sample_plans  # the samples differ


def test_unreachable_budget_is_refused_before_any_layer_runs():
    model, _, _ = make("qwen2_5_vl", "image")
    small, large = qwen_media_inputs(model, [[2, ("image", 4, 4), 2]]), qwen_media_inputs(model, [[2, ("image", 8, 12), 2]])
    calls = []
    handle = model.model.language_model.layers[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pruneware.prune(model, "info-horizon", avg_tokens=10):
            logits(model, large)  # 24 visual tokens: 10 per layer is reachable
            assert calls
            calls.clear()
            with pytest.raises(pruneware.PlanError, match=r"sample 1 of the batch \(4 visual tokens\).*choose a value in \[1\.0, 4\]"):
                logits(model, pad_batch([large, small]))
    finally:
        handle.remove()
    assert not calls


def test_written_budgets_conflict_with_avg_tokens():
    model = tiny_llava()
    with pytest.raises(pruneware.PlanError, match="sets its own budgets, which conflict with avg_tokens=64"):
        pruneware.prune(model, "random@pre:0.02", avg_tokens=64)
    with pytest.raises(pruneware.PlanError, match="conflict"):
        pruneware.prune(model, pruneware.Plan.parse("random@pre:0.5"), avg_tokens=8)
    inputs = llava_inputs(model, [(3, 1, 4)])
    with pruneware.prune(model, "random@pre:0.02") as run:  # as written: 2% of 16 rounds to 1 token... at least 1
        logits(model, inputs)
    assert run.report.plan == "random@pre:0.02" and run.report.stages[0].n_after == [1]
    with pruneware.prune(model, "divprune@pre,random@3", avg_tokens=6) as run:  # no budgets written: solved
        logits(model, inputs)
    assert abs(run.report.avg_visual_tokens - 6) <= 1
    assert [s.where for s in run.report.stages] == ["pre", 3]


@pytest.mark.parametrize("plan", ["adaptinfer@1:*0.5,adaptinfer@3:*0.6,random@5:0", "divprune@pre:*0.7,fastv@2:*0.5"])
def test_relative_and_zero_budgets_follow_each_samples_own_counts_in_a_padded_batch(plan):
    """`*r` budgets are ratios of the tokens each sample has left (float32, truncated, as the
    official code computes them), and a 0-token stage drops every visual token, per sample."""
    from pruneware.plans.plan import Plan

    model, _, samples = make("qwen2_5_vl", "image")
    batch = pad_batch(samples)
    with pruneware.prune(model, plan, seed=1) as run:
        batched = logits(model, batch)
        report = run.report
        own = [int((s["input_ids"] == model.config.image_token_id).sum()) for s in samples]
        assert [n for n in report.stages[0].n_before] == own
        for b, sample in enumerate(samples):
            assert [s.n_after[b] for s in report.stages] == Plan.parse(plan).keep_counts(own[b])
            alone = logits(model, sample)
            assert [s.n_after[0] for s in run.report.stages] == [s.n_after[b] for s in report.stages]
            torch.testing.assert_close(batched[b, -alone.shape[1]:], alone[0], atol=2e-5, rtol=1e-4)


def test_exact_schedules_refuse_avg_tokens_and_run_once_in_sweeps():
    from pruneware.evals.runner import Variant, variants
    from pruneware.plans import accepts_avg_tokens

    model = tiny_llava()
    for name in ("adaptinfer-llava-64", "adaptinfer-qwen2vl-10", "info-horizon-64"):
        assert not accepts_avg_tokens(name)
        with pytest.raises(pruneware.PlanError, match="exact schedule; it takes no avg_tokens"):
            pruneware.prune(model, name, avg_tokens=64)
    assert accepts_avg_tokens("adaptinfer") and accepts_avg_tokens("divprune@pre,random@3")
    assert not accepts_avg_tokens("adaptinfer@1:*0.5") and not accepts_avg_tokens("random@3:0")
    assert variants(["adaptinfer", "adaptinfer-llava-64"], [64, 128]) == [
        Variant("adaptinfer", 64), Variant("adaptinfer", 128), Variant("adaptinfer-llava-64", None),
    ]
