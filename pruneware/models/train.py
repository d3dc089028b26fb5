"""Train an embedded tiny VLM from scratch on the synthetic benchmark.

    python -m pruneware.models.train --arch llava --steps 1500 --seed 0 --out runs/llava

What makes this fast enough for a 2-core CPU:

* several questions about one image are packed into one sequence, so the image tokens (most
  of the sequence) are paid for once per several supervised answers; a block mask and shifted
  positions make every packed turn see only the image and itself, exactly like a
  one-question prompt (no answer leaks from one turn to another);
* an auxiliary grounding loss (``grounding.py``) on the visual tokens entering the LLM;
* attention supervision (a pointing loss, as in attention-supervised VQA): head 0 of layer 2
  attends from the last word of each noun phrase to the image tokens of the objects the
  phrase describes, head 0 of layer 5 from the answering token to the objects the question is
  about (``LOOK_LAYERS``);
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
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pruneware.evals.synthetic import TASKS, evaluate, make_multi, make_split
from pruneware.evals.synthetic.split import SEED_SPACE

from . import prompt
from .build import ARCHS, LLM, build_tiny
from .grounding import HEADS, cell_targets, phrases, referents
from .recipe.common import save_hf_folder

SELECT_SEED = 4242
# Head 0 of layer 2 learns to attend, from the last word of each noun phrase of a question, to
# the objects the phrase describes; head 0 of layer 5, from the token that predicts the answer,
# to the objects the question is about.
LOOK_LAYERS = {2: "noun", 5: "answer"}


def look_loss(attn, args, kwargs, rows: torch.Tensor, look: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """-log of head 0's attention mass on the referenced objects, from each answering row.

    Recomputes head 0's post-RoPE q (only at ``rows`` [B, Q]) and k ([B, L]); ``look`` [B, Q, L]
    marks the image tokens of the referenced objects, ``allowed`` [B, 1, L, L] is the attention
    mask of the batch. Rows with no referent are skipped.
    """
    h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [B, L, H]
    cos, sin = kwargs["position_embeddings"]
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    b, n, _ = h.shape
    d = attn.head_dim
    q = attn.q_proj(h).view(b, n, -1, d)[:, :, :1].transpose(1, 2)  # [B, 1, L, D]
    k = attn.k_proj(h).view(b, n, -1, d)[:, :, :1].transpose(1, 2)  # [B, 1, L, D]
    q, k = rope(q, k, cos, sin)
    q = q[:, 0].gather(1, rows[..., None].expand(-1, -1, d))  # [B, Q, D]
    logits = q @ k[:, 0].transpose(1, 2) * attn.scaling  # [B, Q, L]
    visible = allowed[:, 0].gather(1, rows[..., None].expand(-1, -1, n))  # [B, Q, L]
    prob = logits.masked_fill(~visible, float("-inf")).softmax(-1)
    mass = (prob * look).sum(-1)  # [B, Q]
    valid = look.any(-1)
    return -(mass[valid] + 1e-6).log().mean() if valid.any() else h.sum() * 0


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


def pack(arch: str, qas: list[tuple[str, str, str]]) -> str:
    """One image and several turns; every turn after the first repeats the first turn's
    layout after the image (question, answer marker, answer, end of turn)."""
    name = "tiny-llava" if arch == "llava" else "tiny-qwen2.5-vl"
    eot = "</s>" if arch == "llava" else "<|im_end|>\n"
    marker = " ASSISTANT: " if arch == "llava" else "<|im_end|>\n<|im_start|>assistant\n"
    (q, a, _), rest = qas[0], qas[1:]
    return prompt(name, q) + " " + a + eot + "".join(f" {q}{marker}{a}{eot}" for q, a, _ in rest)


def turn_mask(ids, attention_mask, start, image_id: int, tok, arch: str):
    """Make packed turns independent: each turn sees the image prefix and itself only.

    Returns a boolean mask [B, 1, L, L] (True: may attend) and ``shift`` [B, L], added to the
    positions so every turn starts at the position the first turn starts at: a packed turn
    is then computed exactly as a one-question prompt.
    """
    b, n = ids.shape
    end_id = image_id if arch == "llava" else tok.convert_tokens_to_ids("<|vision_end|>")
    seg = torch.full((b, n), -1, dtype=torch.long)  # -2: image prefix, -1: padding, k: turn k
    shift = torch.zeros(b, n, dtype=torch.long)
    for i in range(b):
        t1 = int((ids[i] == end_id).nonzero().max()) + 1
        seg[i, :t1] = -2
        answers = start[i].nonzero().flatten().tolist()
        bounds = [t1] + [a + 2 for a in answers]  # a turn ends with the token after its answer
        for k in range(len(answers)):
            seg[i, bounds[k] : bounds[k + 1]] = k
            shift[i, bounds[k] : bounds[k + 1]] = t1 - bounds[k]
    seg[attention_mask == 0] = -1
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0)
    mask = causal & (same | (seg[:, None, :] == -2)) | torch.eye(n, dtype=torch.bool)
    return mask[:, None], shift


def make_batch(processor, arch: str, seed: int, step: int, batch: int, questions: int, steps: int):
    """Model inputs with answer-only labels, cell targets [B, T, 4] and per-label tasks."""
    max_objects, weights = curriculum(step, steps)
    tok = processor.tokenizer
    texts, images, targets, tasks, refs, nouns = [], [], [], [], [], []
    grid = 24 if arch == "llava" else 16
    for i in range(batch):
        image, qas, scene = make_multi(_seed(seed, step, i), questions, max_objects, weights)
        texts.append(pack(arch, qas))
        images.append(image)
        targets.append(cell_targets(scene, grid))
        tasks.append([t for _, _, t in qas])
        refs.append([referents(scene, q) for q, _, _ in qas])
        nouns.append([phrases(scene, q) for q, _, _ in qas])
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
    targets = torch.stack(targets)  # [B, T, 5]
    image_id = processor.image_token_id
    n_q = max(len(r) for r in refs)
    rows = torch.zeros(len(texts), n_q, dtype=torch.long)
    look = torch.zeros(len(texts), n_q, ids.shape[1], dtype=torch.bool)  # [B, Q, L]
    for b, sample_refs in enumerate(refs):
        answer_at = start[b].nonzero().flatten()
        image_at = (ids[b] == image_id).nonzero().flatten()  # [T], row-major cells
        for j, objects in enumerate(sample_refs):
            rows[b, j] = answer_at[j] - 1
            on = torch.isin(targets[b, :, 4], torch.tensor(objects, dtype=torch.long) + 1)
            look[b, j, image_at[on]] = True
    mask, shift = turn_mask(ids, inputs["attention_mask"], start, image_id, tok, arch)
    n_p = max(sum(len(p) for p in sample) for sample in nouns)
    noun_rows = torch.zeros(len(texts), n_p, dtype=torch.long)
    noun_look = torch.zeros(len(texts), n_p, ids.shape[1], dtype=torch.bool)  # [B, P, L]
    for b, sample in enumerate(nouns):
        answer_at = start[b].nonzero().flatten().tolist()
        image_at = (ids[b] == image_id).nonzero().flatten()
        t1 = int(image_at.max()) + (1 if arch == "llava" else 2)  # first word after the image
        turn_at = [answer_at[j - 1] + 2 if j else t1 for j in range(len(answer_at))]
        r = 0
        for j, sample_phrases in enumerate(sample):
            for i, objects in sample_phrases:
                noun_rows[b, r] = turn_at[j] + i
                on = torch.isin(targets[b, :, 4], torch.tensor(objects, dtype=torch.long) + 1)
                noun_look[b, r, image_at[on]] = True
                r += 1
    return inputs, labels, start, targets, tasks, (rows, look, noun_rows, noun_look), (mask, shift)


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
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--questions", type=int, default=12, help="questions packed per image")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--aux", type=float, default=0.5, help="weight of the grounding loss")
    ap.add_argument("--look", type=float, default=0.5, help="weight of the attention supervision")
    ap.add_argument("--head-dim", type=int, default=LLM["head_dim"])
    ap.add_argument("--rope-theta", type=float, default=LLM["rope_theta"])
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args.threads)
    model, processor = build_tiny(args.arch, seed=args.seed, head_dim=args.head_dim, rope_theta=args.rope_theta)
    model.to(device).train()
    hidden = model.config.text_config.hidden_size
    torch.manual_seed(args.seed)
    aux_head = torch.nn.Linear(hidden, sum(HEADS.values())).to(device)
    captured: dict[str, torch.Tensor] = {}

    def grab(_module, _args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"]  # [B, L, H]

    hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    batch_look: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    look_terms: list[torch.Tensor] = []

    def supervisor(kind: str):
        def supervise(attn, args, kwargs):
            if kind in batch_look:
                look_terms.append(look_loss(attn, args, kwargs, *batch_look[kind]))

        return supervise

    for j, kind in LOOK_LAYERS.items():
        model.model.language_model.layers[j].self_attn.register_forward_pre_hook(supervisor(kind), with_kwargs=True)
    params = list(model.parameters()) + list(aux_head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    image_id = model.config.image_token_id if args.arch != "llava" else model.config.image_token_index
    select = make_split("eval", 200, SELECT_SEED)
    args.out.mkdir(parents=True, exist_ok=True)
    curve = (args.out / "curve.jsonl").open("a")
    best, t0, running = -1.0, time.time(), {t: [] for t in TASKS}
    for step in range(args.steps):
        inputs, labels, start, targets, tasks, (rows, look, noun_rows, noun_look), (mask, shift) = make_batch(
            processor, args.arch, args.seed, step, args.batch, args.questions, args.steps
        )
        inputs, labels, mask, shift = inputs.to(device), labels.to(device), mask.to(device), shift.to(device)
        if args.arch == "llava":
            positions = torch.arange(shift.shape[1], device=device)[None] + shift  # [B, L]
        else:
            positions = model.model.get_rope_index(
                inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"],
                attention_mask=inputs["attention_mask"],
            )[0] + shift[None]  # [3, B, L]
        batch_look["answer"] = (rows.to(device), look.to(device), mask)
        batch_look["noun"] = (noun_rows.to(device), noun_look.to(device), mask)
        out = model(**{**inputs, "attention_mask": mask}, position_ids=positions, labels=labels)
        batch_look.clear()
        look_term = sum(look_terms) / len(look_terms)
        look_terms.clear()
        vis = captured.pop("embeds")[inputs["input_ids"] == image_id].view(args.batch, -1, hidden)
        logits = aux_head(vis)  # [B, T, sum(HEADS)]
        aux = sum(
            F.cross_entropy(part.flatten(0, 1), targets[..., k].flatten().to(device))
            for k, part in enumerate(logits.split(list(HEADS.values()), dim=-1))  # targets[..., 4] unused
        )
        loss = out.loss + args.aux * aux + args.look * look_term
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
            row = {"step": step, "loss": round(out.loss.item(), 4), "aux": round(aux.item(), 4), "look": round(look_term.item(), 4),
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
                save_hf_folder(model, processor, args.out / "last")
                if res["accuracy"] > best:
                    best = res["accuracy"]
                    save_hf_folder(model, processor, args.out / "best")
            curve.write(json.dumps(row) + "\n")
            curve.flush()
            print(json.dumps(row), flush=True)
    hook.remove()


if __name__ == "__main__":
    main()
