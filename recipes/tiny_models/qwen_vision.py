"""Stage 1 for tiny-qwen2.5-vl: the Qwen2.5-VL vision tower alone, on per-cell labels.

    python -m recipes.tiny_models.qwen_vision --out training/tiny-qwen2.5-vl/vision \\
        --teacher training/tiny-llava/vision/last --steps 2000

The tower sees the rendered 336-px scene in 7-px patches (a 48 x 48 patch grid); its 2 x 2
merger gives 24 x 24 = 576 visual tokens, one per cell of the grid ``grounding.cell_targets``
labels, the same grid tiny-llava's recipe uses, so stage 2's language model carries over.
A linear head on the merged tokens predicts each cell's colour, shape, glyph and whether an
object's centre lies in it (stage 1's weighted cross-entropy, ``vision.cell_loss``), plus a
distillation term: the KL divergence to the per-cell predictions of tiny-llava's trained
stage-1 tower (``--teacher``), which already reads shape and glyph (0.92 / 1.00 object-level).
Qwen2.5-VL's tower has no absolute position embedding (only 2-D RoPE), so unlike tiny-llava's
tokens these carry no cell position: the language model reads it from M-RoPE.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pruneware.models.build import SHIPPED_VISION, build_tiny
from pruneware.models.grounding import HEADS

from .common import load_checkpoint, lr_at, optimizer_step, save_checkpoint
from .vision import GRID, VISION_SPEC, batch, build_tower, cell_loss, cell_metrics, features, selection

QWEN_VISION = SHIPPED_VISION["qwen2.5-vl"]  # tiny-qwen2.5-vl's tower (pruneware.models.build)
TEMPORAL, MERGE = 2, 2


QWEN_ROPE: dict = {}  # overrides of the LLM's RoPE base and M-RoPE sections (``build.QWEN_LLM``); see use_qwen_rope


def use_qwen_rope(theta: float | None, sections: str | None) -> None:
    """Override the RoPE base and M-RoPE sections (``"4,4,4"``) of the Qwen models built from here on
    (the stages' ``--rope-theta`` / ``--mrope``; the default is ``build.QWEN_LLM``, base 1000 with
    sections 1,2,9). The runs before 2026-12-02 06:00 used base 1e6 with 4,4,4, where the width
    section turns by 0.0024 rad across the 24 x 24 cells and the LLM cannot tell columns apart."""
    if theta is not None:
        QWEN_ROPE["rope_theta"] = float(theta)
    if sections:
        QWEN_ROPE["mrope"] = [int(x) for x in sections.split(",")]


def build_qwen(seed: int):
    """A tiny Qwen2.5-VL whose tower gives 24 x 24 merged tokens at 336 px, and its processor."""
    return build_tiny("qwen2.5-vl", seed=seed, vision=QWEN_VISION, **QWEN_ROPE)


def qwen_patches(clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL patch rows of CLIP-normalised images [B, 3, 336, 336]: ``(pixel_values
    [B * 2304, 3 * 2 * 7 * 7], image_grid_thw [B, 3])``, laid out as ``Qwen2VLImageProcessor``
    lays them out (each image repeated over the 2 temporal frames, 2 x 2 merge groups adjacent)."""
    b, c, s, _ = clip.shape
    p = QWEN_VISION["patch"]
    g = s // p
    x = clip[:, None].expand(b, TEMPORAL, c, s, s)  # [B, T, C, S, S]
    x = x.reshape(b, TEMPORAL, c, g // MERGE, MERGE, p, g // MERGE, MERGE, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [B, gh, gw, m, m, C, T, p, p]
    rows = x.reshape(b * g * g, c * TEMPORAL * p * p)
    return rows, torch.tensor([[1, g, g]] * b)


def merged_tokens(visual, clip: torch.Tensor) -> torch.Tensor:
    """The tower's merged tokens [B, 576, D] for images [B, 3, 336, 336] (row-major cells)."""
    rows, thw = qwen_patches(clip)
    return visual(rows, grid_thw=thw).pooler_output.reshape(clip.shape[0], GRID * GRID, -1)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per cell and label head, object cells up-weighted; logits
    [B, 576, sum(HEADS)], ``targets`` [B, 576, 5] (for the weights)."""
    w = (0.25 + (targets[..., 4] > 0).float()).flatten()
    total = student.new_zeros(())
    for s, t in zip(student.split(list(HEADS.values()), -1), teacher.split(list(HEADS.values()), -1), strict=True):
        kl = F.kl_div(s.flatten(0, 1).log_softmax(-1), t.flatten(0, 1).log_softmax(-1), log_target=True, reduction="none").sum(-1)
        total = total + (kl * w).sum() / w.sum()
    return total


def load_teacher(folder: Path, seed: int):
    """tiny-llava's stage-1 tower and head (frozen): a function pixels -> cell logits."""
    model, _ = build_tower(seed)
    tower = model.model.vision_tower.eval()
    head = torch.nn.Sequential(torch.nn.LayerNorm(VISION_SPEC["hidden"]), torch.nn.Linear(VISION_SPEC["hidden"], sum(HEADS.values())))
    load_checkpoint(folder, {"tower": tower, "head": head}, None)
    for p in [*tower.parameters(), *head.parameters()]:
        p.requires_grad_(False)
    return lambda pixels: head(features(tower, pixels))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--teacher", type=Path, help="tiny-llava stage-1 checkpoint to distil from")
    ap.add_argument("--distill", type=float, default=1.0, help="weight of the distillation term")
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
    model, _ = build_qwen(args.seed)
    visual = model.model.visual.train()
    width = model.config.text_config.hidden_size
    torch.manual_seed(args.seed)
    head = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, sum(HEADS.values())))
    teacher = load_teacher(args.teacher, args.seed) if args.teacher else None
    params = list(visual.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    modules = {"visual": visual, "head": head}
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
        pixels, targets = batch("qwen-vision", args.seed, step, args.batch)
        logits = head(merged_tokens(visual, pixels))
        loss = cell_loss(logits, targets)
        kd = distill_loss(logits, teacher(pixels), targets) if teacher else loss.new_zeros(())
        optimizer_step(opt, loss + args.distill * kd, params, lr_at(step, args.steps, args.lr, args.warmup))
        last = step == args.steps - 1
        if step % 20 == 0 or last:
            row = {"step": step, "loss": round(loss.item(), 4), "kd": round(kd.item(), 4), "elapsed_s": round(time.time() - t0)}
            if step % args.eval_every == 0 or last:
                visual.eval()
                with torch.no_grad():
                    got = torch.cat([head(merged_tokens(visual, p)) for p in sel_pixels.split(10)])
                    row["select"] = cell_metrics(got, sel_targets)
                visual.train()
            curve.write(json.dumps(row) + "\n")
            curve.flush()
            print(json.dumps(row), flush=True)
        if time.time() - saved > args.save_minutes * 60 or last:
            save_checkpoint(args.out / "last", modules, opt, {"step": step + 1, "elapsed_s": time.time() - t0, "spec": QWEN_VISION})
            saved = time.time()


if __name__ == "__main__":
    main()
