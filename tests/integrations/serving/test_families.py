"""The plugin's LLaVA-NeXT, Qwen2-VL and Qwen3-VL variants, and tensor parallelism, on the real
vLLM CPU engine (`.venv-vllm`; drivers: drive_families.py, drive_tp.py).

Per family, on a tiny checkpoint with seeded random weights, one engine per plan:
- the base architecture gives every image its full placeholder count (for LLaVA-NeXT this checks
  `anyres_grid` against vLLM's own count);
- a keep-all budget (`random@pre:1.0`) through the pruned class answers exactly as the base
  model: positions (scheduling-time slots + forward-time offsets) and rows are the original ones;
- `divprune@pre:0.25` and seeded `random@pre:0.25` emit exactly the pruned placeholder count
  (the prompt length vLLM reports shrinks by the pruned tokens), and greedy tokens repeat.
"""

from __future__ import annotations

import os

import pytest

from pruneware.plans.plan import Plan
from pruneware.policies.base import split_budget
from tests.integrations.serving.conftest import run_driver

pytestmark = pytest.mark.slow

PLANS = [None, "random@pre:1.0", "divprune@pre:0.25", "random@pre:0.25"]


def expected_placeholders(family: str, plan: str, grid: list[int]) -> int:
    stage = Plan.parse(plan).stages[0]
    if family == "llava-next":
        side, h, w = grid
        return sum(split_budget([side * side, h * w], stage.keep_count(side * side + h * w))) + h
    frames, rows, cols = grid
    return frames * stage.keep_count(rows * cols)


@pytest.mark.parametrize("family", ["llava-next", "qwen2-vl", "qwen3-vl"])
def test_family_on_cpu_engine(vllm_python, tmp_path, family):
    result = run_driver(vllm_python, "tests.integrations.serving.drive_families",
                        {"family": family, "dir": str(tmp_path / family), "plans": PLANS})
    base, keep_all, *pruned = result["runs"]
    grids = result["grids"]
    if family == "llava-next":
        full = [side * side + h * (w + 1) for side, h, w in grids]
        assert any(w != h for _, h, w in grids), grids  # the test images unpad to non-square grids
    else:
        full = [t * r * c for t, r, c in grids]
    assert base["placeholders"] == full
    assert keep_all["placeholders"] == full
    assert keep_all["tokens"] == base["tokens"], "keep-all through the plugin must answer as the base model"
    assert len({tuple(t) for t in base["tokens"]}) > 1, "the random weights should answer images differently"
    for run in pruned:
        want = [expected_placeholders(family, run["plan"], g) for g in grids]
        assert run["placeholders"] == want, run["plan"]
        assert all(w < f for w, f in zip(want, full, strict=True))
        assert run["prompt_lengths"] == [n - f + w for n, f, w in zip(base["prompt_lengths"], full, want, strict=True)]
    for run in result["runs"]:
        assert run["tokens"] == run["tokens_again"], run["plan"]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor_parallel_size=2 needs two cores")
def test_tensor_parallel_matches_single(vllm_python):
    result = run_driver(vllm_python, "tests.integrations.serving.drive_tp", {"sizes": [1, 2], "n": 20})
    assert result["2"]["prompt_lengths"] == result["1"]["prompt_lengths"]
    assert result["2"]["texts"] == result["1"]["texts"]
