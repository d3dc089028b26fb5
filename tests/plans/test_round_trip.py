"""Issue 33 row 9: `Plan.parse(str(plan)) == plan` for every valid plan, and a Stage whose
parameters the grammar cannot write is refused when it is made."""

from __future__ import annotations

import numpy as np
import pytest

from pruneware import Plan, PlanError, Stage


@pytest.mark.parametrize("budget", [5e-05, 1e-10, 0.1, 1 / 3, 2**-30, 5e-324, 1.0, np.float64(0.25)])
@pytest.mark.parametrize("relative", [False, True])
def test_every_ratio_round_trips(budget, relative):
    plan = Plan((Stage("random", "pre", budget, relative=relative), Stage("random", 3, 64, "compact")))
    text = str(plan)
    assert "e" not in text.split(",")[0].split(":")[1], text  # positional notation, with a dot
    assert Plan.parse(text) == plan
    assert str(Plan.parse(text)) == text


def test_an_exponent_ratio_parses_as_a_ratio():
    assert Stage.parse("random@pre:5e-05").budget == 5e-05
    assert Stage.parse("random@pre:2.5E-3").budget == 0.0025
    with pytest.raises(PlanError, match=r"ratio must be in \(0, 1\]"):
        Stage.parse("random@pre:1e2")


@pytest.mark.parametrize(
    "params",
    [{"flag": True}, {"flag": False}, {"eps": 1e-07}, {"eps": 3.0}, {"n": 3}, {"mode": "fast"}, {"b": 1, "a": 2}],
)
def test_every_writable_parameter_round_trips(params):
    plan = Plan((Stage("random", 2, 0.5, params=params),))
    assert Plan.parse(str(plan)) == plan


def test_parameters_are_kept_sorted_whatever_order_they_come_in():
    assert Stage("random", 2, params=(("b", 1), ("a", 2))) == Stage("random", 2, params={"a": 2, "b": 1})


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"mode": "a;b"}, "cannot be written in a plan string"),
        ({"mode": "a,b"}, "cannot be written in a plan string"),
        ({"mode": "x]"}, "cannot be written in a plan string"),
        ({"mode": "3"}, "cannot be written in a plan string"),
        ({"mode": "true"}, "cannot be written in a plan string"),
        ({"mode": " pad"}, "cannot be written in a plan string"),
        ({"mode": [1]}, "cannot be written in a plan string"),
        ({"eps": float("nan")}, "must be finite"),
        ({"bad key": 1}, "must be a word"),
        ((("a", 1), ("a", 2)), "given twice"),
    ],
)
def test_unwritable_parameters_are_refused(params, match):
    with pytest.raises(PlanError, match=match):
        Stage("random", 2, 0.5, params=params)
