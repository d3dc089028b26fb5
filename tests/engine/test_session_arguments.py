"""Issue 33 rows 7 and 8: every argument of `prune` / `attach` is checked when the session is
created, and `small_images="keep"` lets a batch mixing image sizes run under `avg_tokens`."""

from __future__ import annotations

import pytest
import torch

import pruneware
from pruneware.engine.arguments import SEED_MAX, SEED_MIN, stage_seed
from tests.reference import pad_batch
from tests.tiny import qwen_inputs, tiny_llava, llava_inputs, tiny_qwen


def hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(seed=None), r"seed must be an integer in \[-2\*\*63, 2\*\*64 - 1\].*got None"),
        (dict(seed=2**70), r"seed must be an integer in \[-2\*\*63, 2\*\*64 - 1\]"),
        (dict(seed=-(2**63) - 1), r"seed must be an integer in \[-2\*\*63, 2\*\*64 - 1\]"),
        (dict(seed=1.5), r"seed must be an integer.*got 1.5"),
        (dict(seed=True), r"seed must be an integer.*got True"),
        (dict(avg_tokens="64"), r"avg_tokens must be a positive number .* or None; got '64'"),
        (dict(avg_tokens=0), r"avg_tokens must be a positive finite number"),
        (dict(avg_tokens=-3.0), r"avg_tokens must be a positive finite number"),
        (dict(avg_tokens=float("nan")), r"avg_tokens must be a positive finite number"),
        (dict(avg_tokens=float("inf")), r"avg_tokens must be a positive finite number"),
        (dict(on_report="x"), r"on_report must be a callable taking a Report, or None; got 'x'"),
        (dict(small_images="drop"), r"small_images must be one of \('error', 'keep'\), got 'drop'"),
    ],
)
@pytest.mark.parametrize("entry", ["prune", "attach"])
def test_bad_arguments_fail_when_the_session_is_created(entry, kwargs, match):
    model = tiny_llava(layers=2)
    before = hook_count(model)
    with pytest.raises(pruneware.ArgumentError, match=match) as caught:
        getattr(pruneware, entry)(model, "random@pre:0.5", **kwargs)  # no forward runs
    assert isinstance(caught.value, TypeError) and isinstance(caught.value, ValueError)
    assert hook_count(model) == before
    assert pruneware.engine.session.attached_session(model) is None


@pytest.mark.parametrize("seed", [SEED_MIN, -1, 0, 7, 2**40, SEED_MAX])
def test_every_seed_in_torchs_range_runs_and_is_reproducible(seed):
    model = tiny_llava(layers=2)
    inputs = llava_inputs(model, [(2, 1, 2)])
    kept = []
    for _ in range(2):
        with pruneware.prune(model, "random@pre:0.3,random@1:0.5", seed=seed) as run, torch.no_grad():
            model(**inputs)
        kept.append([s.kept[0] for s in run.report.stages])
    assert all(torch.equal(a, b) for a, b in zip(*kept, strict=True))


def test_stage_seeds_are_unchanged_where_they_already_worked():
    assert stage_seed(5, 2) == 5 * 1_000_003 + 2
    assert stage_seed(-5, 0) == -5 * 1_000_003  # torch remaps negative seeds itself
    assert SEED_MIN <= stage_seed(SEED_MAX, 3) <= SEED_MAX


# --- row 7: mixed image sizes under avg_tokens ---------------------------------------------------


def mixed_batch(model):
    """A 64-token and a 16-token image (below avg_tokens=32), as separate samples and one batch."""
    big = qwen_inputs(model, [(3, [(16, 16)], 4)], seed=1)
    small = qwen_inputs(model, [(5, [(8, 8)], 2)], seed=2)
    return big, small, pad_batch([big, small])


def test_a_sample_below_avg_tokens_is_an_error_by_default():
    model = tiny_qwen(layers=4)
    _, _, batch = mixed_batch(model)
    with pruneware.prune(model, "divprune", avg_tokens=32) as run:
        with pytest.raises(pruneware.PlanError, match=r"sample 1 of the batch \(16 visual tokens\).*\[.*, 16\]"):
            model(**batch)
    assert run.report.stages == []


def test_small_images_keep_keeps_every_token_of_a_small_sample_and_says_so():
    model = tiny_qwen(layers=4)
    big, small, batch = mixed_batch(model)
    with torch.no_grad():
        small_unpruned = model(**small).logits
        with pruneware.prune(model, "divprune", avg_tokens=32, small_images="keep") as run:
            batched = model(**batch).logits
            report = run.report
            big_alone = model(**big).logits
            alone_report = run.report
    assert report.below_budget == [1]
    assert alone_report.below_budget == []
    (stage,) = report.stages
    assert stage.n_before == [64, 16] and stage.n_after == [32, 16]
    assert report.sample_plans == ["divprune@pre:32", "divprune@pre:16"]
    n = small["input_ids"].shape[1]
    torch.testing.assert_close(batched[1, -n:], small_unpruned[0], atol=2e-5, rtol=1e-4)
    n = big_alone.shape[1]  # the `pre` stage shortened the sequence
    torch.testing.assert_close(batched[0, -n:], big_alone[0], atol=2e-5, rtol=1e-4)
    assert report.summary()["below_budget"] == [1]


def test_small_images_keep_still_refuses_an_avg_tokens_below_reach():
    model = tiny_qwen(layers=4)
    _, _, batch = mixed_batch(model)
    with pruneware.prune(model, "fastv", avg_tokens=0.5, small_images="keep"):
        with pytest.raises(pruneware.PlanError, match=r"sample 0 .*choose a value in"):
            model(**batch)
