"""The synthetic benchmark must tell good policies from bad: on each shipped tiny model, keeping
2% of the visual tokens at random before the LLM costs at least 20 accuracy points."""

from __future__ import annotations

import pytest

import pruneware
from pruneware.evals.synthetic import evaluate, make_split
from pruneware.models import MODELS, available, load

pytestmark = pytest.mark.slow  # 150 questions per model, unpruned and pruned

# A shipped checkpoint that answers mostly from priors loses less than 20 points. Measured on
# this split; the bar stays. (tiny-llava: unpruned 0.947, 2% random 0.373, -57 points;
# tiny-qwen2.5-vl: unpruned 0.973, 2% random 0.353, -62 points.)
BELOW_BAR: dict[str, str] = {}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=BELOW_BAR[n])) if n in BELOW_BAR else n
     for n in sorted(MODELS)],
)
def test_keeping_two_percent_at_random_costs_twenty_points(name):
    if name not in available():
        pytest.skip(f"{name} has no trained weights in this checkout")
    model, processor = load(name)
    examples = make_split("eval", 150, seed=31337)
    base = evaluate(model, processor, examples, batch_size=25)["accuracy"]
    with pruneware.prune(model, "random@pre:0.02", seed=0) as run:
        pruned = evaluate(model, processor, examples, batch_size=25)["accuracy"]
    assert run.report.stages[0].n_after[0] <= 0.02 * run.report.stages[0].n_before[0] + 1
    assert base - pruned >= 0.20, f"unpruned {base:.3f}, 2% random {pruned:.3f}"
