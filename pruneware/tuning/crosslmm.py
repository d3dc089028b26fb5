"""Train CrossLMM's V2V compressor by distillation against the frozen unpruned model.

    pruneware train-adapter --model tiny-llava --budget 16 --steps 150 --out runs/crosslmm-16
    python -m pruneware.tuning.crosslmm ...   (the same)

The loss is the KL divergence, on the answer tokens, from the unpruned model's next-token
distribution to the pruned model's, over a calibration set drawn from the synthetic train split
(prompt + answer, teacher forcing). Only the compressor is trained; the model stays frozen.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import pruneware
from pruneware.policies.crosslmm.compressor import V2VCompressor, live_compressor, save_compressor


def calibration_batch(processor, examples) -> tuple[dict, list[int]]:
    """Left-padded prompt+answer inputs and the answer's token count per example."""
    from pruneware.evals.synthetic.accuracy import build_prompt

    tok = processor.tokenizer
    texts = [build_prompt(processor, e.question) + e.answer for e in examples]
    lengths = [len(tok(e.answer, add_special_tokens=False)["input_ids"]) for e in examples]
    side, tok.padding_side = tok.padding_side, "left"
    try:
        inputs = processor(text=texts, images=[e.image for e in examples], return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    return inputs, lengths


def answer_kl(teacher: torch.Tensor, student: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Mean over examples of the summed KL(teacher || student) at the answer-predicting positions.

    teacher: [B, L, V]; student: [B, L', V] (prompt+answer are the last tokens of both).
    """
    losses = []
    for b, n in enumerate(lengths):
        t = teacher[b, -n - 1 : -1].float().log_softmax(-1)
        s = student[b, -n - 1 : -1].float().log_softmax(-1)
        losses.append(torch.nn.functional.kl_div(s, t, log_target=True, reduction="sum"))
    return torch.stack(losses).mean()


def train(model, processor, budget: int, steps: int, batch: int, lr: float, seed: int, rank: int = 32,
          log=print) -> tuple[V2VCompressor, list[dict]]:
    from pruneware.evals.synthetic import make_split

    torch.manual_seed(seed)
    model.requires_grad_(False)
    dim = model.config.get_text_config().hidden_size
    compressor = V2VCompressor(dim, rank)
    optimizer = torch.optim.AdamW(compressor.parameters(), lr=lr, weight_decay=0.0)
    curve = []
    with live_compressor(compressor) as key:
        plan = f"crosslmm[compressor={key}]@pre:{budget}"
        for step in range(steps):
            examples = make_split("train", batch, seed=seed * 100_003 + step)
            inputs, lengths = calibration_batch(processor, examples)
            with torch.no_grad():
                teacher = model(**inputs).logits
            with pruneware.prune(model, plan):
                student = model(**inputs).logits
            loss = answer_kl(teacher, student, lengths)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 10 == 0 or step == steps - 1:
                curve.append({"step": step, "kl": round(loss.item(), 5), "gate": round(torch.tanh(compressor.gate).item(), 4)})
                log(f"step {step:4d}  kl {loss.item():.4f}  gate {torch.tanh(compressor.gate).item():+.3f}")
    return compressor.eval(), curve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llava")
    parser.add_argument("--budget", type=int, default=16, help="visual tokens kept per image")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    from pruneware.models.loading import load_any

    model, processor = load_any(args.model)
    start = time.time()
    compressor, curve = train(model, processor, args.budget, args.steps, args.batch, args.lr, args.seed, args.rank)
    meta = {"model": args.model, "budget": args.budget, "steps": args.steps, "batch": args.batch, "lr": args.lr,
            "seed": args.seed, "seconds": round(time.time() - start, 1), "curve": curve}
    out = save_compressor(compressor, args.out, {"training": meta})
    print(json.dumps({"saved": str(out), **{k: v for k, v in meta.items() if k != "curve"}}))
    Path(args.out, "curve.json").write_text(json.dumps(curve, indent=1))


if __name__ == "__main__":
    main()
