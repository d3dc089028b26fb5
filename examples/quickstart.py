"""Prune a LLaVA-architecture model's visual tokens and compare with the unpruned answer.

Uses the embedded tiny model when it is installed (`pruneware.models`), else a random-weight
LLaVA built from a config, so it never downloads anything.

    python examples/quickstart.py [--plan "divprune@pre:0.25,random@4:0.5"]
"""

from __future__ import annotations

import argparse
import time

import torch

import pruneware


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", default="divprune@pre:0.25,random@4:0.5")
    args = parser.parse_args()
    from pruneware.models import load, prompt
    from pruneware.evals.synthetic import make_split

    model, processor = load("tiny-llava")
    example = make_split("eval", 1, seed=7)[0]
    inputs = processor(images=[example.image], text=[prompt("tiny-llava", example.question)], return_tensors="pt")

    def answer() -> tuple[str, float]:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        text = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
        return text.strip(), (time.perf_counter() - start) * 1e3

    print(f"question: {example.question}  (truth: {example.answer})")
    base, base_ms = answer()
    with pruneware.prune(model, args.plan, seed=0) as run:
        pruned, pruned_ms = answer()
    print(f"unpruned: {base!r:12} {base_ms:7.1f} ms")
    print(f"pruned:   {pruned!r:12} {pruned_ms:7.1f} ms  plan={args.plan}")
    print(f"visual tokens per layer: {run.report.avg_visual_tokens:.1f}; LM FLOPs ratio {run.report.flops_ratio:.2f}")


if __name__ == "__main__":
    main()
