"""Vision-side stages served by the real vLLM engine answer like pruneware's Hugging Face path.

`vitK` stages (blocks[:K] of the vision tower on every patch, the rest and the merger/projector
on the kept units) and `pre-vit` (PixelPrune's duplicate units dropped before the tower, as many
as the pixels say) on both shipped tiny models: 200 synthetic questions each, all requests of a
plan in one `generate` call, greedy answers of up to 3 tokens. At least 98% must agree (the two
venvs run different torch and transformers builds), and every prompt must hold as many visual
tokens as the HF session kept for that question. One driver process per model, an engine per plan.
"""

from __future__ import annotations

import pytest
import torch

import pruneware
from pruneware import models
from pruneware.evals.synthetic import make_split
from pruneware.evals.synthetic.accuracy import predict
from pruneware.integrations.vllm.offline import chat_prompt
from tests.integrations.serving.conftest import run_driver
from tests.integrations.serving.test_offline import N

PLANS = {
    "tiny-llava": ["random@vit2:0.25", "divprune@vit1:64"],
    "tiny-qwen2.5-vl": ["divprune@vit1:0.5", "pixelprune@pre-vit:1.0"],
}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=list(PLANS))
def served(request, vllm_python):
    name = request.param
    return name, run_driver(vllm_python, "tests.integrations.serving.drive_offline",
                            {"model": name, "plans": PLANS[name], "n": N})


def hf_answers_and_kept(name: str, plan: str) -> tuple[list[str], list[int], list[int]]:
    """(answers, visual tokens the session kept, unpruned prompt lengths) per question, batches of 25."""
    model, processor = models.load(name)
    items = make_split("eval", N, seed=0)
    answers: list[str] = []
    kept: list[int] = []
    record = lambda report: kept.extend(round(v) for v in report.visual_per_sample)  # noqa: E731
    for i in range(0, N, 25):
        with pruneware.prune(model, plan, seed=0, on_report=record), torch.inference_mode():
            answers += predict(model, processor, items[i : i + 25])
    lengths = [processor(text=chat_prompt(processor, item.question), images=item.image, return_tensors="pt")
               ["input_ids"].shape[1] for item in items]
    return answers, kept, lengths


@pytest.mark.parametrize("plan", sorted({p for plans in PLANS.values() for p in plans}))
def test_vit_stages_answer_like_hf(served, plan):
    name, results = served
    if plan not in PLANS[name]:
        pytest.skip(f"{plan} is not served on {name} here")
    answers, kept, full = hf_answers_and_kept(name, plan)
    theirs = results[plan]["answers"]
    assert len(kept) == N
    agree = sum(a == b for a, b in zip(answers, theirs, strict=True)) / N
    assert agree >= 0.98, f"{name} {plan}: vLLM and HF agree on {agree:.3f} of {N} questions"
    visual = 576  # a 336-px image: 24 x 24 visual tokens on both tiny models
    served_kept = [p - (f - visual) for p, f in zip(results[plan]["prompt_lengths"], full, strict=True)]
    assert served_kept == kept, f"{name} {plan}: vLLM prompts hold other visual-token counts than the HF session kept"
    assert sum(kept) < N * visual, f"{name} {plan}: the stage dropped nothing"
