"""The eval runner's one-pass answers: generate's first logits are the prompt's next-token logits."""

from __future__ import annotations

import pytest
import torch

import pruneware
from pruneware.evals.datasets import load_benchmark
from pruneware.evals.runner import prompt_inputs, timed_answers
from pruneware.models import build_tiny


@pytest.mark.parametrize("family", ["llava", "qwen2.5-vl"])
@pytest.mark.parametrize("plan", [None, "divprune@pre:0.25", "fastv@2:0.5"])
def test_timed_answers_equal_a_forward_and_a_plain_generate(family, plan):
    """A padded batch of different questions: logits equal ``model(**inputs)``'s last row, and
    the answers equal a separate greedy ``generate``, unpruned and under a plan."""
    model, processor = build_tiny(family, seed=0)
    items = load_benchmark("synthetic", limit=3, seed=5)
    inputs = prompt_inputs(processor, items, torch.device("cpu"))
    assert (inputs["attention_mask"] == 0).any()  # left padding is exercised
    pad = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else processor.tokenizer.eos_token_id

    def run():
        logits, answers, ms = timed_answers(model, processor, inputs, max_new_tokens=3)
        with torch.inference_mode():
            want = model(**inputs).logits[:, -1].float()
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=pad)
        texts = processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
        assert answers == [t.strip() for t in texts]
        assert ms > 0

    if plan is None:
        run()
    else:
        with pruneware.prune(model, plan, seed=0):
            run()
