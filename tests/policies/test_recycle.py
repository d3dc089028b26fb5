"""Recycling as a plan option (`policy[recycle=nearest|context]`): the merge rules against plain
loops written here, a pruned forward against the plain layer loop, keep-all is the unpruned
model, a padded batch equals its samples alone, and bad parameters name the valid ones."""

from __future__ import annotations

import pytest
import torch

import pruneware
from pruneware import PlanError
from pruneware.plans.plan import Plan
from pruneware.policies import build_policy
from pruneware.policies.recycle import merge_into_nearest
from tests.reference import kept_positions, pad_batch, record_lm_inputs, reference_logits
from tests.tiny import IMAGE_TOKEN, llava_inputs, qwen_inputs, tiny_llava, tiny_qwen


def loop_nearest(x: torch.Tensor, kept: list[int], weight: float) -> torch.Tensor:
    """Each pruned token joins its most cosine-similar kept token; (x_k + w sum) / (1 + w n)."""
    groups: dict[int, list[int]] = {k: [] for k in kept}
    for i in range(x.shape[0]):
        if i in groups:
            continue
        sims = [float(torch.nn.functional.cosine_similarity(x[i], x[k], dim=0)) for k in kept]
        groups[kept[max(range(len(kept)), key=lambda j: sims[j])]].append(i)
    return torch.stack([(x[k] + weight * sum((x[i] for i in groups[k]), torch.zeros_like(x[k])))
                        / (1 + weight * len(groups[k])) for k in kept])


def loop_context(x: torch.Tensor, kept: list[int], c: int) -> tuple[list[int], torch.Tensor]:
    """VisionZip's contextual rule (dvlab-research/VisionZip `clip_encoder.py`) on the pruned tokens:
    strided targets among them in slot order, the rest assigned by cosine similarity, each
    contextual token = target + mean of its assigned tokens. Returns the kept slots and states."""
    pruned = [i for i in range(x.shape[0]) if i not in kept]
    step = max(1, len(pruned) // c)
    targets = list(range(0, len(pruned), step))[:c]
    rest = [j for j in range(len(pruned)) if j not in targets]
    assigned: dict[int, list[int]] = {t: [] for t in targets}
    for j in rest:
        sims = [float(torch.nn.functional.cosine_similarity(x[pruned[j]], x[pruned[t]], dim=0)) for t in targets]
        assigned[targets[max(range(len(targets)), key=lambda m: sims[m])]].append(pruned[j])
    states = {k: x[k] for k in kept}
    for t in targets:
        members = assigned[t]
        mean = torch.stack([x[i] for i in members]).mean(0) if members else torch.zeros_like(x[0])
        states[pruned[t]] = x[pruned[t]] + mean
    slots = sorted(states)
    return slots, torch.stack([states[s] for s in slots])


@pytest.mark.parametrize(("n", "k", "weight"), [(17, 5, 1.0), (40, 1, 0.5), (9, 8, 2.0), (6, 6, 1.0)])
def test_nearest_merge_equals_the_loop(n, k, weight):
    x = torch.randn(n, 12, generator=torch.Generator().manual_seed(n + k))
    kept = torch.randperm(n, generator=torch.Generator().manual_seed(k))[:k].sort().values
    torch.testing.assert_close(merge_into_nearest(x, kept, weight), loop_nearest(x, kept.tolist(), weight))


def test_zero_weight_leaves_kept_tokens_as_they_are():
    x = torch.randn(20, 8)
    kept = torch.tensor([1, 7, 11])
    assert torch.equal(merge_into_nearest(x, kept, 0.0), x[kept])


def stage_input(n: int, d: int = 10, seed: int = 0):
    from pruneware.policies.base import StageInput

    hidden = torch.randn(1, n, d, generator=torch.Generator().manual_seed(seed))
    return StageInput(hidden, torch.ones(1, n, dtype=torch.bool), torch.zeros(1, n, dtype=torch.long), None, 0, 0)


@pytest.mark.parametrize(("n", "budget", "contexts"), [(30, 8, 2), (30, 8, 0.25), (11, 4, 3), (50, 20, 1)])
def test_context_merge_equals_visionzips_rule_within_the_budget(n, budget, contexts):
    inputs = stage_input(n, seed=n)
    policy = build_policy(Plan.parse(f"divprune[recycle=context;contexts={contexts}]@pre:{budget}").stages[0])
    c = contexts if isinstance(contexts, int) else max(1, round(budget * contexts))
    plain = build_policy(Plan.parse(f"divprune@pre:{budget - c}").stages[0]).select(inputs, [budget - c])[0]
    out = policy.merge(inputs, [budget])
    slots, states = loop_context(inputs.hidden[0], plain.tolist(), c)
    assert out.keep[0].tolist() == slots and len(slots) == budget  # c contextual tokens count in the budget
    torch.testing.assert_close(out.embeds[0], states)


def model_and_samples(family: str):
    """A model and three samples: text around one image, and two images in the third."""
    if family == "llava":
        model = tiny_llava()
        return model, [llava_inputs(model, [(5, 1, 9)], seed=1), llava_inputs(model, [(2, 1, 6)], seed=2),
                       llava_inputs(model, [(3, 2, 5)], seed=3)]
    model = tiny_qwen()
    return model, [qwen_inputs(model, [(4, [(8, 12)], 9)], seed=1), qwen_inputs(model, [(2, [(8, 8)], 6)], seed=2),
                   qwen_inputs(model, [(3, [(4, 8), (8, 8)], 5)], seed=3)]


PLANS = ["divprune[recycle=nearest]@pre:6", "divprune[recycle=context;contexts=2]@pre:6",
         "random[recycle=nearest]@2:5", "fastv[recycle=context;contexts=2]@2:6,divprune[recycle=nearest]@4:3"]


@pytest.mark.parametrize("family", ["llava", "qwen"])
@pytest.mark.parametrize("plan", ["divprune[recycle=nearest]@pre:1.0", "random[recycle=context]@2:1.0",
                                  "fastv[recycle=nearest;recycle_weight=0.5]@3:1.0"])
def test_keeping_everything_with_recycling_is_the_unpruned_model(family, plan):
    model, samples = model_and_samples(family)
    batch = pad_batch(samples)
    with torch.no_grad():
        want = model(**batch).logits
        with pruneware.prune(model, plan):
            got = model(**batch).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["llava", "qwen"])
@pytest.mark.parametrize("plan", PLANS)
def test_a_padded_batch_equals_its_samples_alone(family, plan):
    model, samples = model_and_samples(family)
    batch = pad_batch(samples)
    with pruneware.prune(model, plan) as run, torch.no_grad():
        logits = model(**batch).logits[:, -1]
        together = [[s.kept[b] for s in run.report.stages] for b in range(len(samples))]
    for b, sample in enumerate(samples):
        offset = batch["input_ids"].shape[1] - sample["input_ids"].shape[1]
        with pruneware.prune(model, plan) as run, torch.no_grad():
            alone = model(**sample).logits[0, -1]
        for s, kept in enumerate(together[b]):
            assert (kept - offset).tolist() == run.report.stages[s].kept[0].tolist(), f"sample {b}, stage {s}"
        torch.testing.assert_close(logits[b], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_a_pre_stage_feeds_the_merged_states_to_the_plain_layer_loop(family):
    """The recycled forward equals the plain layer loop run on the kept slots, whose embeddings
    are the divprune choice merged with `loop_nearest` (written without pruneware's engine)."""
    model, samples = model_and_samples(family)
    sample = samples[0]
    with pruneware.prune(model, "divprune@pre:6") as run, torch.no_grad():
        model(**sample)
    kept = run.report.stages[0].kept[0]  # original positions divprune keeps
    with pruneware.prune(model, "divprune[recycle=nearest]@pre:6") as run, torch.no_grad():
        got = model(**sample).logits[0, -1]
    assert torch.equal(run.report.stages[0].kept[0], kept)
    seen = record_lm_inputs(model, sample)
    visual = (sample["input_ids"][0] == IMAGE_TOKEN).nonzero().squeeze(1)
    embeds = seen["embeds"].clone()
    chosen = [int((visual == k).nonzero()) for k in kept]
    embeds[0, kept] = loop_nearest(seen["embeds"][0, visual], chosen, 1.0)
    rows = kept_positions(sample["input_ids"][0], [IMAGE_TOKEN], kept)
    want = reference_logits(model, {**seen, "embeds": embeds}, [(0, rows)])[0, -1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with pruneware.prune(model, "divprune@pre:6") as run, torch.no_grad():
        plain = model(**sample).logits[0, -1]
    assert not torch.allclose(got, plain)  # the merged states are really there


def test_recycling_is_a_plan_option_that_round_trips_and_refuses_bad_values():
    text = "divprune[contexts=4;recycle=context]@pre:64,random[recycle=nearest;recycle_weight=0.5]@8:16"
    assert str(Plan.parse(text)) == text
    assert str(Plan.parse("divprune[recycle=nearest]@pre:64")) == "divprune[recycle=nearest]@pre:64"
    cases = {
        "divprune[recycle=mean]@pre:64": "valid modes: none, nearest, context",
        "divprune[contexts=3]@pre:64": "recycle=nearest|context",
        "divprune[recycle=nearest;contexts=3]@pre:64": "recycle=context",
        "divprune[recycle=context;contexts=1.5]@pre:64": "share of the budget",
        "divprune[recycle=nearest;recycle_weight=-1]@pre:64": "recycle_weight",
        "visionzip[recycle=nearest]@pre:64": "merges by its own rule",
        "random[recycle=nearest]@vit2:0.5": "not in the vision tower",
    }
    for plan, message in cases.items():
        with pytest.raises(PlanError, match=message.replace("|", r"\|")):
            build_policy(Plan.parse(plan).all_stages[0])
    assert type(build_policy(Plan.parse("divprune[recycle=none]@pre:64").stages[0])).__name__ == "DivPrunePolicy"


def test_eval_plan_lists_keep_a_policys_parameters_together():
    from pruneware.cli.common import split_plans

    assert split_plans("none;divprune[recycle=nearest;recycle_weight=0.5]@pre;divprune@pre:9,random@3:2") == [
        "none", "divprune[recycle=nearest;recycle_weight=0.5]@pre", "divprune@pre:9,random@3:2"]
    assert split_plans("fastv,divprune[recycle=context;contexts=3]@pre:0.5") == [
        "fastv", "divprune[recycle=context;contexts=3]@pre:0.5"]
    one = "divprune[recycle=nearest;recycle_weight=0.5]@pre:158,divprune@1:79"
    assert split_plans(one) == [one]


def test_avg_tokens_keeps_a_plans_policy_parameters():
    """A budget-free plan solved by avg_tokens runs the policy with its [params] (recycling included)."""
    from pruneware.plans.presets import user_template

    template = user_template(Plan.parse("divprune[recycle=context;contexts=0.05]@pre,random[recycle=nearest]@3"), 6)
    solved = template.build(6, 64, 576)
    assert [dict(s.params) for s in solved.stages] == [{"recycle": "context", "contexts": 0.05}, {"recycle": "nearest"}]
    model, samples = model_and_samples("llava")
    with pruneware.prune(model, "divprune[recycle=nearest]@pre", avg_tokens=8) as run, torch.no_grad():
        got = model(**samples[0]).logits[0, -1]
    with pruneware.prune(model, "divprune@pre", avg_tokens=8), torch.no_grad():
        plain = model(**samples[0]).logits[0, -1]
    assert run.report.stages[0].n_after == [8] and not torch.allclose(got, plain)
