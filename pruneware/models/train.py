"""Train an embedded tiny VLM from scratch on the synthetic benchmark.

    python -m pruneware.models.train --arch llava --steps 1500 --seed 0 --out runs/llava

What makes this fast enough for a 2-core CPU:

* several questions about one image are packed into one multi-turn sequence, so the image
  tokens (most of the sequence) are paid for once per several supervised answers;
* an auxiliary grounding loss (``grounding.py``) on the visual tokens entering the LLM;
* a curriculum on the number of objects per scene, LR warmup and cosine decay.

The loss is on answer tokens (and the end-of-turn token after each) only. Every
``--eval-every`` steps the model is scored on a fresh 200-question eval split (seed 4242, not
the seed used for model cards) and saved to ``OUT/last``; the best so far goes to ``OUT/best``.
A JSON line per log step goes to ``OUT/curve.jsonl``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pruneware.evals.synthetic import TASKS, evaluate, make_multi, make_split
from pruneware.evals.synthetic.split import SEED_SPACE

from .build import ARCHS, build_tiny
from .grounding import HEADS, cell_targets

SELECT_SEED = 4242


def _seed(seed: int, step: int, i: int) -> int:
    """Train-split scene seed of item ``i`` of batch ``step`` (always < 10**9)."""
    d = hashlib.blake2b(f"train:{seed}:{step}:{i}".encode(), digest_size=8).digest()
    return int.from_bytes(d, "little") % SEED_SPACE


def curriculum(step: int, steps: int) -> tuple[int, dict[str, float]]:
    """``(max_objects, task_weights)``: few objects and easy tasks first."""
    frac = step / max(steps, 1)
    max_objects = 2 if frac < 0.06 else min(6, 3 + int((frac - 0.06) / 0.06))
    if frac < 0.06:
        return max_objects, {"existence": 1, "attribute": 1, "glyph": 0.6, "counting": 0.3, "spatial": 0.3}
    return max_objects, {"existence": 0.8, "attribute": 0.8, "glyph": 1, "counting": 1.3, "spatial": 1.3}


def make_batch(processor, arch: str, seed: int, step: int, batch: int, questions: int, steps: int):
    """Model inputs with answer-only labels, cell targets [B, T, 4] and per-label tasks."""
    max_objects, weights = curriculum(step, steps)
    tok = processor.tokenizer
    texts, images, targets, tasks = [], [], [], []
    grid = 24 if arch == "llava" else 16
    for i in range(batch):
        image, qas, scene = make_multi(_seed(seed, step, i), questions, max_objects, weights)
        messages = []
        for j, (q, a, _) in enumerate(qas):
            content = ([{"type": "image"}] if j == 0 else []) + [{"type": "text", "text": q}]
            messages += [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": a}]}]
        texts.append(processor.apply_chat_template(messages, tokenize=False))
        images.append(image)
        targets.append(cell_targets(scene, grid))
        tasks.append([t for _, _, t in qas])
    side, tok.padding_side = tok.padding_side, "right"
    try:
        inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    ids = inputs["input_ids"]  # [B, L]
    if arch == "llava":
        m1, m2 = tok.convert_tokens_to_ids(["ASSISTANT", ":"])
    else:
        m1, m2 = tok.convert_tokens_to_ids(["<|im_start|>", "assistant"])
    start = torch.zeros_like(ids, dtype=torch.bool)
    start[:, 2:] = (ids[:, :-2] == m1) & (ids[:, 1:-1] == m2)  # first answer token
    keep = start.clone()
    keep[:, 1:] |= start[:, :-1]  # and the end-of-turn token after it
    labels = torch.where(keep, ids, torch.full_like(ids, -100))
    return inputs, labels, start, torch.stack(targets), tasks


def lr_at(step: int, steps: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(steps - warmup, 1)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=ARCHS, required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--questions", type=int, default=6, help="questions packed per image")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--aux", type=float, default=0.5, help="weight of the grounding loss")
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args.threads)
    model, processor = build_tiny(args.arch, seed=args.seed)
    model.to(device).train()
    hidden = model.config.text_config.hidden_size
    torch.manual_seed(args.seed)
    aux_head = torch.nn.Linear(hidden, sum(HEADS.values())).to(device)
    captured: dict[str, torch.Tensor] = {}

    def grab(_module, _args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"]  # [B, L, H]

    hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    params = list(model.parameters()) + list(aux_head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    image_id = model.config.image_token_id if args.arch != "llava" else model.config.image_token_index
    select = make_split("eval", 200, SELECT_SEED)
    args.out.mkdir(parents=True, exist_ok=True)
    curve = (args.out / "curve.jsonl").open("a")
    best, t0, running = -1.0, time.time(), {t: [] for t in TASKS}
    for step in range(args.steps):
        inputs, labels, start, targets, tasks = make_batch(
            processor, args.arch, args.seed, step, args.batch, args.questions, args.steps
        )
        inputs, labels = inputs.to(device), labels.to(device)
        out = model(**inputs, labels=labels)
        vis = captured.pop("embeds")[inputs["input_ids"] == image_id].view(args.batch, -1, hidden)
        logits = aux_head(vis)  # [B, T, sum(HEADS)]
        aux = sum(
            F.cross_entropy(part.flatten(0, 1), targets[..., k].flatten().to(device))
            for k, part in enumerate(logits.split(list(HEADS.values()), dim=-1))
        )
        loss = out.loss + args.aux * aux
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            pred = out.logits[:, :-1].argmax(-1)  # prediction for position p+1
            hit = (pred == inputs["input_ids"][:, 1:])[start[:, 1:].to(device)].tolist()
        flat = [t for ts in tasks for t in ts]
        for t, h in zip(flat, hit, strict=True):
            running[t] = (running[t] + [h])[-300:]
        if step % 25 == 0 or step == args.steps - 1:
            row = {"step": step, "loss": round(out.loss.item(), 4), "aux": round(aux.item(), 4),
                   "lr": opt.param_groups[0]["lr"], "elapsed_s": round(time.time() - t0),
                   "train_acc": {t: round(sum(v) / max(len(v), 1), 3) for t, v in running.items()}}  # fmt: skip
            if (step > 0 and step % args.eval_every == 0) or step == args.steps - 1:
                model.eval()
                hook.remove()
                res = evaluate(model, processor, select, batch_size=25)
                hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
                model.train()
                row["eval_acc"] = round(res["accuracy"], 4)
                row["eval_per_task"] = {t: round(v, 3) for t, v in res["per_task"].items()}
                model.save_pretrained(args.out / "last")
                processor.save_pretrained(args.out / "last")
                if res["accuracy"] > best:
                    best = res["accuracy"]
                    model.save_pretrained(args.out / "best")
                    processor.save_pretrained(args.out / "best")
            curve.write(json.dumps(row) + "\n")
            curve.flush()
            print(json.dumps(row), flush=True)
    hook.remove()


if __name__ == "__main__":
    main()
