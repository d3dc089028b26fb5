"""`divprune[spatial=w]`: DivPrune's optional grid-distance term, through the policy and a session.

The kernel-level rule (all three backends equal, the rule written out, a hand-checked case, bad
values) is tested in tests/kernels/test_divprune.py; here: the policy hands each image its own
grid, refuses a stage that does not see the whole grid, and a session runs it on both families.
"""

from __future__ import annotations

import pytest
import torch

import pruneware
from pruneware import PlanError
from pruneware.kernels.divprune import max_min_diverse
from pruneware.plans.plan import Plan
from pruneware.policies import build_policy
from pruneware.policies.base import StageInput
from tests.official import official_divprune
from tests.reference import pad_batch
from tests.tiny import llava_inputs, qwen_inputs, tiny_llava, tiny_qwen


def policy(text: str):
    return build_policy(Plan.parse(text).stages[0])


def two_image_input(seed: int = 0) -> StageInput:
    """One sample: a 2x3 image then a 1x4 image (10 tokens, 6 features)."""
    hidden = torch.randn(1, 10, 6, generator=torch.Generator().manual_seed(seed))
    image_ids = torch.tensor([[0] * 6 + [1] * 4])
    return StageInput(hidden, torch.ones(1, 10, dtype=torch.bool), image_ids, None, 0, 0, grids=[[(2, 3), (1, 4)]])


def test_each_image_selects_on_its_own_grid():
    inputs = two_image_input()
    got = policy("divprune[spatial=0.7]@pre:5").select(inputs, [5])[0]  # the budget splits 3 + 2
    first = max_min_diverse(inputs.hidden[:, :6], 3, 0.7, (2, 3))[0]
    second = max_min_diverse(inputs.hidden[:, 6:], 2, 0.7, (1, 4))[0] + 6
    assert got.tolist() == sorted(first.tolist() + second.tolist())


def test_the_knob_changes_what_is_kept_in_a_hand_checked_case():
    # A 1 x 4 image of features e1, e2, e2, e1 (tests/kernels/test_divprune.py works the distances out):
    # the official rule keeps tokens {0, 1}, spatial=1 keeps {0, 2}.
    e1, e2 = torch.eye(2)
    hidden = torch.stack([e1, e2, e2, e1])[None]
    inputs = StageInput(hidden, torch.ones(1, 4, dtype=torch.bool), torch.zeros(1, 4, dtype=torch.long), None, 0, 0,
                        grids=[[(1, 4)]])
    assert torch.as_tensor(policy("divprune@pre:2").select(inputs, [2])).tolist() == [[0, 1]]
    assert [t.tolist() for t in policy("divprune[spatial=1]@pre:2").select(inputs, [2])] == [[0, 2]]


def test_the_default_is_the_official_rule():
    inputs = two_image_input(seed=4)
    assert policy("divprune@pre:4") == policy("divprune[spatial=0]@pre:4")
    got = policy("divprune[spatial=0]@pre:4").select(StageInput(inputs.hidden[:, :6], inputs.valid[:, :6],
                                                                 inputs.image_ids[:, :6], None, 0, 0), [4])
    assert torch.as_tensor(got)[0].tolist() == official_divprune(inputs.hidden[0, :6], 4 / 6).sort().values.tolist()


@pytest.mark.parametrize("value, message", [("-1", "spatial=-1: a finite number >= 0"), ("abc", "spatial='abc'"),
                                            ("nan", "spatial=nan")])
def test_bad_values_are_refused_with_the_valid_range(value, message):
    with pytest.raises(PlanError, match=message):
        policy(f"divprune[spatial={value}]@pre:4")


def test_the_knob_round_trips_and_combines_with_recycling():
    text = "divprune[recycle=nearest;spatial=0.25]@pre:8,divprune[recycle=nearest]@2:4"
    assert str(Plan.parse(text)) == text
    assert policy(text).inner.spatial == 0.25


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_a_session_runs_it_and_a_batch_equals_its_samples_alone(family):
    if family == "llava":
        model = tiny_llava()
        samples = [llava_inputs(model, [(5, 1, 9)], seed=1), llava_inputs(model, [(3, 2, 5)], seed=3)]
    else:
        model = tiny_qwen()
        samples = [qwen_inputs(model, [(4, [(8, 12)], 9)], seed=1),
                   qwen_inputs(model, [(3, [(4, 8), (8, 8)], 5)], seed=3)]
    plan = "divprune[spatial=0.5]@pre:6"
    batch = pad_batch(samples)
    with pruneware.prune(model, plan) as run, torch.no_grad():
        model(**batch)
        together = run.report.stages[0].kept
    for b, sample in enumerate(samples):
        offset = batch["input_ids"].shape[1] - sample["input_ids"].shape[1]
        with pruneware.prune(model, plan) as run, torch.no_grad():
            model(**sample)
        assert (together[b] - offset).tolist() == run.report.stages[0].kept[0].tolist()


def test_a_stage_that_does_not_see_the_whole_grid_is_refused_naming_pre():
    model = tiny_llava()
    with pruneware.prune(model, "divprune@pre:8,divprune[spatial=0.5]@2:4"), torch.no_grad():
        with pytest.raises(ValueError, match=r"not its whole 4x4 grid.*place it at `pre`"):
            model(**llava_inputs(model, [(5, 1, 9)], seed=1))
