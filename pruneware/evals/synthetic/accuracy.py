"""Exact-match accuracy of a VLM on synthetic examples, by greedy short generation.

``evaluate`` only calls ``model.generate``, so it works unchanged inside a
``with pruneware.prune(model, plan):`` block.
"""

from __future__ import annotations

import string
from collections import defaultdict
from collections.abc import Sequence

import torch

from .split import Example


def build_prompt(processor, question: str) -> str:
    """The generation prompt for one image and one question, from the processor's chat template."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if getattr(processor, "chat_template", None) is None:
        raise ValueError("the processor has no chat_template; evaluate() needs one to build prompts")
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def normalize(text: str) -> str:
    """First word of ``text``, lowercased, without surrounding punctuation."""
    words = text.strip().lower().split()
    return words[0].strip(string.punctuation) if words else ""


@torch.inference_mode()
def predict(model, processor, examples: Sequence[Example], max_new_tokens: int = 3) -> list[str]:
    """Greedy answers for one batch, with left padding so every prompt ends at the same column."""
    from pruneware.evals.qwen_inputs import vision_inputs  # Qwen processors: through qwen-vl-utils

    tok = processor.tokenizer
    inputs = vision_inputs(processor, [e.question for e in examples], [e.image for e in examples]).to(model.device)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id
    )  # [B, L + new]
    new = out[:, inputs["input_ids"].shape[1] :]
    return [normalize(t) for t in tok.batch_decode(new, skip_special_tokens=True)]


def evaluate(model, processor, examples: Sequence[Example], batch_size: int = 16) -> dict:
    """Accuracy overall and per task.

    Returns ``{"accuracy": float, "per_task": {task: float}, "counts": {task: int}, "n": int,
    "predictions": [str]}``; predictions follow the order of ``examples``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    preds: list[str] = []
    for i in range(0, len(examples), batch_size):
        preds += predict(model, processor, examples[i : i + batch_size])
    hits: dict[str, list[bool]] = defaultdict(list)
    for e, p in zip(examples, preds, strict=True):
        hits[e.task].append(p == e.answer)
    total = [h for v in hits.values() for h in v]
    return {
        "accuracy": sum(total) / max(len(total), 1),
        "per_task": {t: sum(v) / len(v) for t, v in sorted(hits.items())},
        "counts": {t: len(v) for t, v in sorted(hits.items())},
        "n": len(total),
        "predictions": preds,
    }
