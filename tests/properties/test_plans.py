"""Property: every valid plan round-trips through its string, and the plan generator of this
suite draws plans the session accepts (so the other properties are not vacuous)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pruneware import Plan, PlanError, Stage
from pruneware.policies import available
from tests.properties.strategies import FAMILIES, examples, plans

_PARAM_VALUES = st.one_of(
    st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False),
    st.text("abcxyz_-./", min_size=1, max_size=6),
)


@st.composite
def any_stage(draw, where) -> Stage:
    policy = draw(st.sampled_from(sorted(available())))
    relative = draw(st.booleans())
    if relative or draw(st.booleans()):
        budget = draw(st.floats(min_value=5e-324, max_value=1.0, exclude_min=False))
    else:
        budget = draw(st.integers(0, 10**9))
    params = draw(st.dictionaries(st.from_regex(r"[a-z_][a-z0-9_]{0,5}", fullmatch=True), _PARAM_VALUES, max_size=3))
    try:
        return Stage(policy, where, budget, draw(st.sampled_from(["keep", "compact"])), params, relative)
    except PlanError:  # a text parameter that reads back as a number or a bool is refused
        return Stage(policy, where, budget, relative=relative)


@st.composite
def any_plan(draw) -> Plan:
    """Any plan the grammar allows (any registered policy, any layer, any budget), model aside."""
    layers = sorted(draw(st.sets(st.integers(0, 200), min_size=0, max_size=3)))
    pre = (draw(st.booleans()) and 0 not in layers) or not layers  # `pre` and layer 0 are one place
    places = (["pre"] if pre else []) + layers
    return Plan(tuple(draw(any_stage(where)) for where in places))


@examples(50)
@given(any_plan())
def test_every_plan_round_trips_through_its_string(plan):
    text = str(plan)
    assert Plan.parse(text) == plan
    assert str(Plan.parse(text)) == text


@pytest.mark.parametrize("family", FAMILIES)
@examples(20)
@given(data=st.data())
def test_generated_plans_run_on_the_model_and_round_trip(family, data):
    plan = data.draw(plans(family))
    assert Plan.parse(str(plan)) == plan
