"""The same plan means the same model: vLLM's offline `LLM` with the plugin answers like
pruneware's Hugging Face path, on the shipped tiny models, and its prompts hold the pruned count.

Runs 200 synthetic questions per model through one vLLM driver process (an engine per plan) and
through `pruneware.prune` here; greedy answers must agree on at least 98% of them (the two
venvs run different torch and transformers builds, so bit-equal logits are not expected)."""

from __future__ import annotations

import pytest
import torch

import pruneware
from pruneware import models
from pruneware.evals.synthetic import make_split
from pruneware.evals.synthetic.accuracy import predict
from pruneware.integrations.vllm.spec import PruneSpec
from pruneware.plans import Plan
from tests.integrations.serving.conftest import run_driver

N = 200
PLANS = ["divprune@pre:64", "random@pre:0.25", "crosslmm@pre:64"]
GRID = (24, 24)  # both tiny models see a 336-px image as 24 x 24 visual tokens
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["tiny-llava", "tiny-qwen2.5-vl"])
def served(request, vllm_python):
    """(model name, {plan: vLLM answers and prompt lengths}) for N questions."""
    name = request.param
    return name, run_driver(vllm_python, "tests.integrations.serving.drive_offline",
                            {"model": name, "plans": ["none", *PLANS], "n": N})


def hf_answers(name: str, plan: str) -> list[str]:
    model, processor = models.load(name)
    items = make_split("eval", N, seed=0)
    answers: list[str] = []
    for i in range(0, N, 25):
        batch = items[i : i + 25]
        if plan == "none":
            answers += predict(model, processor, batch)
        else:
            with pruneware.prune(model, plan, seed=0), torch.inference_mode():
                answers += predict(model, processor, batch)
    return answers


@pytest.mark.parametrize("plan", ["none", *PLANS])
def test_vllm_answers_equal_hf_answers(served, plan):
    name, results = served
    ours, theirs = hf_answers(name, plan), results[plan]["answers"]
    agree = sum(a == b for a, b in zip(ours, theirs, strict=True)) / N
    assert agree >= 0.98, f"{name} {plan}: vLLM and HF agree on {agree:.3f} of {N} questions"


@pytest.mark.parametrize("plan", PLANS)
def test_vllm_prompt_holds_the_pruned_count(served, plan):
    name, results = served
    kept = PruneSpec(Plan.parse(plan).stages[0]).item_tokens(1, *GRID)
    full = results["none"]["prompt_lengths"]
    pruned = results[plan]["prompt_lengths"]
    assert [f - p for f, p in zip(full, pruned, strict=True)] == [GRID[0] * GRID[1] - kept] * N
