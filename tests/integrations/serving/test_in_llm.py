"""In-LLM stages served by the real vLLM engine answer like pruneware's Hugging Face path.

`random@4:0.25` (random pruning before layer 4 of the tiny models' 8, the Information Horizon
paper's method), the `info-horizon` preset (DivPrune before the LLM, then random before layer
5 of 8) and `fastv@2:0.1` (scored in the step by the last token's attention at layer 1; it
changes about a third of tiny-llava's answers) and PyramidDrop's three stages (layer K's own
attention, previewed), on both shipped tiny models: 200 synthetic questions each, all requests in one
`generate` call (so the engine batches requests with different images and kept sets), greedy
answers of up to 3 tokens (prefill and decode through the pruned levels). At least 98% must
agree (the two venvs run different torch and transformers builds)."""

from __future__ import annotations

import pytest

from tests.integrations.serving.conftest import run_driver
from tests.integrations.serving.test_offline import N, hf_answers

PLANS = ["random@4:0.25", "info-horizon", "fastv@2:0.1", "pdrop@2:0.5,pdrop@4:0.25,pdrop@6:0.1"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["tiny-llava", "tiny-qwen2.5-vl"])
def served(request, vllm_python):
    name = request.param
    return name, run_driver(vllm_python, "tests.integrations.serving.drive_offline",
                            {"model": name, "plans": PLANS, "n": N})


@pytest.mark.parametrize("plan", PLANS)
def test_in_llm_stages_answer_like_hf(served, plan):
    name, results = served
    ours, theirs = hf_answers(name, plan), results[plan]["answers"]
    agree = sum(a == b for a, b in zip(ours, theirs, strict=True)) / N
    assert agree >= 0.98, f"{name} {plan}: vLLM and HF agree on {agree:.3f} of {N} questions"
    if "@pre" not in plan and plan != "info-horizon":  # no pre stage: every placeholder enters the LLM
        unpruned = hf_answers(name, "none")
        changed = sum(a != b for a, b in zip(theirs, unpruned, strict=True))
        assert changed > 0, f"{name} {plan}: the served answers equal the unpruned ones: the stage dropped nothing"
