"""Check that a checkpoint in the serving layout computes what the original computes.

    python benchmarks/serving_layout_check.py OLD_DIR NEW_DIR [--n 200] [--plans none,divprune@pre:64]

For each plan, runs the first `n` questions of the reporting split (`make_split("eval", n,
seed=0)`) through both checkpoints with pruneware's Hugging Face path, and prints the largest
difference of the last prompt token's logits, and whether the greedy answers agree.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import pruneware
from pruneware.evals.synthetic import make_split
from pruneware.evals.synthetic.accuracy import build_prompt, predict


@torch.inference_mode()
def last_logits(model, processor, examples) -> torch.Tensor:
    """[B, V] the logits of the last prompt token, left-padded batch."""
    tok = processor.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    try:
        inputs = processor(text=[build_prompt(processor, e.question) for e in examples],
                           images=[e.image for e in examples], return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    return model(**inputs).logits[:, -1].float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--plans", default="none,divprune@pre:64,random@pre:0.25,crosslmm@pre:64,fastv@2:64")
    args = parser.parse_args()
    torch.manual_seed(0)
    models = [AutoModelForImageTextToText.from_pretrained(p).eval() for p in (args.old, args.new)]
    processor = AutoProcessor.from_pretrained(args.old)
    examples = make_split("eval", args.n, seed=0)
    print(f"| plan | questions | max abs logit diff | answers equal | accuracy old | accuracy new |")
    print("|---|---|---|---|---|---|")
    for plan in args.plans.split(","):
        diff, same, right = 0.0, 0, [0, 0]
        for i in range(0, len(examples), args.batch_size):
            batch = examples[i : i + args.batch_size]
            logits, answers = [], []
            for model in models:
                ctx = pruneware.prune(model, plan, seed=0) if plan != "none" else torch.inference_mode()
                with ctx:
                    logits.append(last_logits(model, processor, batch))
                    answers.append(predict(model, processor, batch))
            diff = max(diff, (logits[0] - logits[1]).abs().max().item())
            same += sum(a == b for a, b in zip(*answers, strict=True))
            for j, got in enumerate(answers):
                right[j] += sum(a == e.answer for a, e in zip(got, batch, strict=True))
        n = len(examples)
        print(f"| {plan} | {n} | {diff:.2e} | {same}/{n} | {right[0] / n:.3f} | {right[1] / n:.3f} |", flush=True)


if __name__ == "__main__":
    main()
