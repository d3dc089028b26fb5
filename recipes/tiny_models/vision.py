"""Stage 1: the vision tower alone, on dense per-cell labels.

    python -m recipes.tiny_models.vision --out training/tiny-llava/vision --steps 2000

A linear head on the tower's patch features ([B, 576, H], the features LLaVA feeds its
projector) predicts, for each of the 24 x 24 cells, the colour, shape and glyph of the object
under the cell centre and whether the object's centre lies in the cell (labels from
``pruneware.models.grounding.cell_targets``). Object, glyph and centre cells are up-weighted:
they are a small fraction of the image and all the language model needs. The head is dropped
after training. The tower's patch position embeddings start from a 2-D sin/cos code, so
neighbouring cells start out similar (locality the tower would otherwise learn slowly).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pruneware.evals.synthetic import TASKS, render
from pruneware.models.build import SHIPPED_VISION, build_tiny
from pruneware.models.grounding import HEADS, cell_targets

from .common import SELECT_SEED, clip_pixels, load_checkpoint, lr_at, optimizer_step, sample, save_checkpoint, train_seed

GRID = 24
VISION_SPEC = SHIPPED_VISION["llava"]  # tiny-llava's tower (pruneware.models.build)
TASK_MIX = {"existence": 1.0, "attribute": 1.0, "counting": 1.0, "spatial": 1.0, "glyph": 1.5}


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """A [grid * grid, dim] 2-D sin/cos code: half the channels encode the row, half the column."""
    quarter = dim // 4
    freq = 1.0 / (grid ** (torch.arange(quarter) / max(quarter - 1, 1)))  # [dim/4]
    pos = torch.arange(grid, dtype=torch.float32)[:, None] * freq[None] * math.pi / 2  # [grid, dim/4]
    axis = torch.cat([pos.sin(), pos.cos()], -1)  # [grid, dim/2]
    rows = axis[:, None].expand(grid, grid, -1)
    cols = axis[None].expand(grid, grid, -1)
    return torch.cat([rows, cols], -1).reshape(grid * grid, -1)


def build_tower(seed: int):
    """A tiny LLaVA (stage 1 trains its vision tower) and its processor, with a 2-D sin/cos
    position code in the tower."""
    model, processor = build_tiny("llava", seed=seed, vision=VISION_SPEC)
    tower = model.model.vision_tower
    emb = tower.embeddings.position_embedding.weight  # [577, H]
    with torch.no_grad():
        emb[1:] = 0.5 * sincos_2d(GRID, emb.shape[1]) + 0.1 * emb[1:]
    return model, processor


def batch(tag: str, seed: int, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels [B, 3, 336, 336] and cell targets [B, 576, 5] of ``size`` train scenes."""
    names, p = list(TASK_MIX), torch.tensor(list(TASK_MIX.values()))
    pixels, targets = [], []
    for i in range(size):
        s = train_seed(tag, seed, step, i)
        task = names[s % len(names)] if p.sum() == 0 else names[int(torch.multinomial(p, 1, generator=torch.Generator().manual_seed(s)))]
        scene, _ = sample(s, task, 6)
        pixels.append(clip_pixels(render(scene)))
        targets.append(cell_targets(scene, GRID))
    return torch.stack(pixels), torch.stack(targets)


def selection(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed held-out set from the eval seed space (never the reporting seed)."""
    pixels, targets = [], []
    for i in range(n):
        scene, _ = sample(10**9 + (SELECT_SEED * 7919 + i) % 10**9, TASKS[i % len(TASKS)], 6)
        pixels.append(clip_pixels(render(scene)))
        targets.append(cell_targets(scene, GRID))
    return torch.stack(pixels), torch.stack(targets)


def features(tower, pixels: torch.Tensor) -> torch.Tensor:
    """Patch features [B, 576, H]: the last layer without CLS, as LLaVA selects them."""
    return tower(pixel_values=pixels).last_hidden_state[:, 1:]


def cell_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Weighted per-cell cross-entropy; ``logits`` [B, 576, sum(HEADS)], ``targets`` [B, 576, 5]."""
    on_object = (targets[..., 4] > 0).float()
    weights = {
        0: 0.25 + on_object, 1: 0.25 + 2 * on_object,
        2: 0.1 + on_object + 4 * (targets[..., 2] > 0).float(), 3: 1 + 4 * targets[..., 3].float(),
    }  # fmt: skip
    total = logits.new_zeros(())
    for k, part in enumerate(logits.split(list(HEADS.values()), dim=-1)):
        ce = F.cross_entropy(part.flatten(0, 1), targets[..., k].flatten(), reduction="none")
        w = weights[k].flatten()
        total = total + (ce * w).sum() / w.sum()
    return total


@torch.no_grad()
def cell_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Accuracy of colour and shape on object cells, glyph on glyph cells, centre recall, and
    object-level shape/glyph accuracy by majority vote over each object's cells."""
    pred = [p.argmax(-1) for p in logits.split(list(HEADS.values()), dim=-1)]
    obj = targets[..., 4] > 0
    gly = targets[..., 2] > 0
    ctr = targets[..., 3] > 0
    out = {
        "color": (pred[0] == targets[..., 0])[obj].float().mean().item(),
        "shape": (pred[1] == targets[..., 1])[obj].float().mean().item(),
        "glyph": (pred[2] == targets[..., 2])[gly].float().mean().item(),
        "center_recall": (pred[3] == 1)[ctr].float().mean().item(),
        "center_precision": ctr[pred[3] == 1].float().mean().item() if (pred[3] == 1).any() else 0.0,
    }
    votes = {"shape": [], "glyph": []}
    for b in range(targets.shape[0]):
        for o in targets[b, :, 4].unique().tolist():
            if o == 0:
                continue
            cells = targets[b, :, 4] == o
            votes["shape"].append(int(pred[1][b][cells].mode().values == targets[b][cells][0, 1]))
            g = cells & gly[b]
            if g.any():
                votes["glyph"].append(int(pred[2][b][g].mode().values == targets[b][g][0, 2]))
    out.update({f"object_{k}": sum(v) / max(len(v), 1) for k, v in votes.items()})
    return {k: round(v, 4) for k, v in out.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--save-minutes", type=float, default=4.0)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = build_tower(args.seed)
    tower = model.model.vision_tower.train()
    hidden = tower.config.hidden_size
    torch.manual_seed(args.seed)
    head = torch.nn.Sequential(torch.nn.LayerNorm(hidden), torch.nn.Linear(hidden, sum(HEADS.values())))
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    modules = {"tower": tower, "head": head}
    start, elapsed = 0, 0.0
    if args.resume and (args.out / "last" / "meta.json").is_file():
        meta = load_checkpoint(args.out / "last", modules, opt)
        start, elapsed = meta["step"], meta["elapsed_s"]
        print(f"resumed at step {start}", flush=True)
    sel_pixels, sel_targets = selection(40)
    args.out.mkdir(parents=True, exist_ok=True)
    curve = (args.out / "curve.jsonl").open("a")
    t0, saved = time.time() - elapsed, time.time()
    for step in range(start, args.steps):
        pixels, targets = batch("vision", args.seed, step, args.batch)
        loss = cell_loss(head(features(tower, pixels)), targets)
        optimizer_step(opt, loss, params, lr_at(step, args.steps, args.lr, args.warmup))
        last = step == args.steps - 1
        if step % 20 == 0 or last:
            row = {"step": step, "loss": round(loss.item(), 4), "elapsed_s": round(time.time() - t0)}
            if step % args.eval_every == 0 or last:
                tower.eval()
                with torch.no_grad():
                    row["select"] = cell_metrics(head(torch.cat([features(tower, p) for p in sel_pixels.split(10)])), sel_targets)
                tower.train()
            curve.write(json.dumps(row) + "\n")
            curve.flush()
            print(json.dumps(row), flush=True)
        if time.time() - saved > args.save_minutes * 60 or last:
            save_checkpoint(args.out / "last", modules, opt, {"step": step + 1, "elapsed_s": time.time() - t0, "spec": VISION_SPEC})
            saved = time.time()


if __name__ == "__main__":
    main()
