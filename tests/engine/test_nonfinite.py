"""NaN or infinite states under a policy that scores them fail the call, naming the stage and its
policy (issue 33, row 5), and leave the model as it was. The flag is computed on the device and
read in the report's one host sync (no extra sync). `random` reads no states: it does not check.
"""

from __future__ import annotations

import pytest
import torch

import pruneware
from pruneware import NonFiniteError
from tests.policies.test_every_policy import fingerprint
from tests.tiny import llava_inputs, tiny_llava


def poisoned(model, value: float) -> dict:
    inputs = llava_inputs(model, [(2, 1, 7), (4, 1, 3)])
    inputs["pixel_values"][1, :, :3, :3] = value  # the second sample's image only
    return inputs


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("plan", ["divprune@pre:8", "divprune@2:8", "random@pre:8,fastv@3:4"])
def test_non_finite_states_raise_naming_the_stage(plan, value):
    model = tiny_llava()
    clean = llava_inputs(model, [(2, 1, 7), (4, 1, 3)])
    with torch.no_grad():
        expected = model(**clean).logits
    before = fingerprint(model)
    scored = plan.split(",")[-1]
    with pruneware.prune(model, plan), torch.no_grad():
        with pytest.raises(NonFiniteError, match=rf"stage {scored}: .*policy '{scored.split('@')[0]}'.*samples \[1\]"):
            model(**poisoned(model, value))
        with pytest.raises(NonFiniteError):
            model.generate(**poisoned(model, value), max_new_tokens=2, do_sample=False)
        model(**clean)  # the session still serves clean inputs
    assert fingerprint(model) == before
    with torch.no_grad():
        assert torch.equal(model(**clean).logits, expected)


def test_a_policy_that_reads_no_states_does_not_check():
    model = tiny_llava()
    with pruneware.prune(model, "random@pre:8") as run, torch.no_grad():
        model(**poisoned(model, float("nan")))
    assert run.report.stages[0].n_after == [8, 8]
