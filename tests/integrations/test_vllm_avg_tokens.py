"""`avg_tokens` in the vLLM plugin: solved per frame from its own token count, as the HF session
solves it per sample; what cannot be served is refused with a clear error. No vllm needed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pruneware.integrations.vllm.spec import spec_from_config
from pruneware.plans import Plan, PlanError
from pruneware.plans.presets import get_preset


def spec(options: dict, layers: int = 8, rope: str = "1d"):
    return spec_from_config(SimpleNamespace(pruneware=options, text_config=SimpleNamespace(num_hidden_layers=layers)), rope)


@pytest.mark.parametrize("plan", ["divprune", "crosslmm", "random@pre", "vision-score@pre"])
@pytest.mark.parametrize("grid", [(24, 24), (12, 20), (9, 9)])
def test_avg_tokens_equals_the_hf_solution_per_frame(plan, grid):
    avg = 64
    got = spec({"plan": plan, "avg_tokens": avg})
    n = grid[0] * grid[1]
    if "@" in plan:
        template_plan = Plan.parse(plan)
        from pruneware.plans.presets import user_template

        expected = user_template(template_plan, 8).build(8, avg, n).stages[0].keep_count(n)
    else:
        expected = get_preset(plan).build(8, avg, n).stages[0].keep_count(n)
    assert got.budget(*grid) == expected == 64  # one `pre` stage: its count is the average
    assert got.item_tokens(2, *grid) == 2 * got.frame(*grid).count


def test_a_frame_smaller_than_avg_tokens_is_refused_with_the_solver_error():
    small = spec({"plan": "divprune", "avg_tokens": 64})
    with pytest.raises(PlanError, match=r"avg_tokens=64.* out of reach .* 25 visual tokens"):
        small.frame(5, 5)


@pytest.mark.parametrize("options, message", [
    ({"plan": "divprune@pre:64", "avg_tokens": 64}, "sets its own budgets"),
    ({"plan": "fastv", "avg_tokens": 64}, "solves one 'pre' stage per frame"),
    ({"plan": "info-horizon", "avg_tokens": 64}, "solves one 'pre' stage per frame"),
    ({"plan": "adaptinfer", "avg_tokens": 64}, "other in-LLM stages"),
    ({"plan": "divprune", "avg_tokens": 0}, "must be a number >= 1"),
    ({"plan": "divprune", "avg_tokens": True}, "must be a number >= 1"),
    ({"plan": "divprune", "budget": 3}, "valid keys"),
])
def test_what_vllm_cannot_serve_is_refused(options, message):
    with pytest.raises(PlanError, match=message):
        spec(options)
