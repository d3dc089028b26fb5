"""Stage 3: join stage 1's vision tower and stage 2's language model into one tiny LLaVA.

    python -m recipes.tiny_models.assemble --vision training/tiny-llava/vision/last \\
        --language training/tiny-llava/language/best --out training/tiny-llava/joint

Phase ``project`` trains the tower and the projector to reproduce, cell by cell, the visual
tokens stage 2's language model was trained on (mean squared error, object cells
up-weighted; the language model is frozen). Phase ``joint`` fine-tunes the whole model end to
end on packed questions about rendered images (answer loss plus stage 2's pointing loss and,
with ``--aux``, its answer-row probes, loaded from the stage-2 checkpoint).
Both phases keep the best model on the selection split (``OUT/best``, a plain HF folder with
its processor) and a resumable checkpoint (``OUT/last-<phase>``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pruneware.evals.synthetic import evaluate, make_split, render

from .common import SELECT_SEED, clip_pixels, load_checkpoint, lr_at, optimizer_step, save_checkpoint, save_hf_folder
from .language import AREA_PROBE, POINT, PROBES, SCENE_MIX, Stage2, add_recipe_switches, apply_mix, apply_recipe_switches, train_batch
from .losses import Probes, install_pointing, set_point_weights
from .packing import COUNT_ACCEPT, N_CELLS, collate, pack
from .qwen_language import CELLPOS_LAYER, Stage2Qwen, cellpos_loss, pack_qwen
from .qwen_vision import build_qwen, merged_tokens, qwen_patches
from .vision import build_tower, features


def assemble(vision: Path, language: Path, seed: int = 0, arch: str = "llava"):
    """``(model, processor, stage2)``: a tiny LLaVA (or Qwen2.5-VL) holding both stages' weights;
    ``stage2`` shares the model's language model and carries the cell embedding (the regression
    target)."""
    tensors = load_checkpoint_tensors(vision)
    if arch == "qwen2.5-vl":
        model, processor = build_qwen(seed)
        model.model.visual.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("visual.")})
        net = Stage2Qwen(model)
    else:
        model, processor = build_tower(seed)
        model.model.vision_tower.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("tower.")})
        net = Stage2(model)
    load_checkpoint(language, {"net": net}, None)
    return model, processor, net


def load_checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "state.safetensors"))


def scenes_batch(seed: int, step: int, size: int, per_image: int, vocab, pack_fn=pack):
    """Packed train samples and their rendered pixels [B, 3, 336, 336]."""
    packs, scenes = train_batch("joint", seed, step, size, per_image, vocab, pack_fn)
    return packs, torch.stack([clip_pixels(render(s)) for s in scenes])


def lr_groups(model: torch.nn.Module, params: list, text: str) -> list[dict]:
    """AdamW parameter groups from ``"layers.3.self_attn.q_proj=5,embed_tokens=5"`` (the
    ``--lr-scale`` option): a parameter whose name contains a key trains at that multiple of the
    schedule's learning rate (the first matching key wins); the rest at 1. A key that matches no
    parameter is an error that lists a few valid names."""
    scales = {k: float(v) for k, _, v in (item.partition("=") for item in filter(None, text.split(",")))}
    trainable = {id(p) for p in params}
    named = [(n, p) for n, p in model.named_parameters() if id(p) in trainable]
    for key in scales:
        if not any(key in n for n, _ in named):
            raise SystemExit(f"--lr-scale: {key!r} matches no trainable parameter; e.g. {[n for n, _ in named[:3]]}")
    groups: dict[float, list] = {}
    for n, p in named:
        groups.setdefault(next((v for k, v in scales.items() if k in n), 1.0), []).append(p)
    return [{"params": ps, "scale": scale} for scale, ps in sorted(groups.items())]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vision", type=Path, required=True)
    ap.add_argument("--language", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--phase", choices=["project", "joint"], required=True)
    ap.add_argument("--init", type=Path, help="start from this HF folder (e.g. OUT/best of phase project)")
    ap.add_argument("--init-vision", type=Path, help="take only the tower and projector from this HF folder (e.g. a shipped model)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--questions", type=int, default=12)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--point", type=float, default=0.3)
    ap.add_argument("--aux", type=float, default=0.0, help="weight of stage 2's answer-row probes, loaded with its checkpoint (joint)")
    ap.add_argument("--mix", default="", help="question-mix overrides, e.g. counting=2.5")
    ap.add_argument("--scene-mix", default="", help="scene-kind overrides, e.g. counting=15 (more scenes with a forced group)")
    ap.add_argument("--count-accept", default="",
                    help="share of counting questions kept per answer, e.g. one=0.006,two=0.015,three=0.1 (four: all)")
    ap.add_argument("--point-weights", default="", help="per-kind pointing weights, e.g. object=10")
    ap.add_argument("--lr-scale", default="", help="joint phase: learning-rate factors for parameters whose name contains a key, e.g. layers.3.self_attn.q_proj=5")
    ap.add_argument("--arch", choices=["llava", "qwen2.5-vl"], default="llava")
    add_recipe_switches(ap)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--select-n", type=int, default=200, help="questions in the selection split")
    ap.add_argument("--save-minutes", type=float, default=4.0)
    ap.add_argument("--snapshot-every", type=int, default=0,
                    help="also keep an HF folder OUT/step-N every N steps and at the end, to select on a held-out split")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)
    if args.lr_scale and args.phase != "joint":
        ap.error("--lr-scale applies to --phase joint only (the project phase trains the tower and projector at one rate)")
    torch.set_num_threads(args.threads)
    apply_mix(args.mix)
    apply_mix(args.scene_mix, SCENE_MIX, "--scene-mix")
    apply_mix(args.count_accept, COUNT_ACCEPT, "--count-accept")
    apply_recipe_switches(args)
    set_point_weights(args.point_weights, POINT)
    qwen = args.arch == "qwen2.5-vl"
    pack_fn = pack_qwen if qwen else pack
    model, processor, net = assemble(args.vision, args.language, args.seed, args.arch)
    if args.init is not None:
        model.load_state_dict(type(model).from_pretrained(args.init).state_dict())
    if args.init_vision is not None:
        state = type(model).from_pretrained(args.init_vision).state_dict()
        vision = {k: v for k, v in state.items() if not k.startswith(("model.language_model.", "lm_head."))}
        missing, unexpected = model.load_state_dict(vision, strict=False)
        assert not unexpected and all(k.startswith(("model.language_model.", "lm_head.")) for k in missing), (missing, unexpected)
    vocab = processor.tokenizer.get_vocab()
    cfg = model.config.text_config
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    if qwen:  # the merger is Qwen's projector
        tower = model.model.visual
        project = lambda pixels: merged_tokens(tower, pixels)  # noqa: E731
    else:
        tower, projector = model.model.vision_tower, model.model.multi_modal_projector
        project = lambda pixels: projector(features(tower, pixels))  # noqa: E731
    if args.phase == "project" and qwen:
        params = list(tower.parameters())
    elif args.phase == "project":
        params = list(tower.parameters()) + list(projector.parameters())
    else:
        params = [p for n, p in model.named_parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    net.cell.requires_grad_(False)
    spec = {**PROBES, "area": AREA_PROBE} if args.count_area else PROBES
    probes = Probes({**spec, "cellpos": (CELLPOS_LAYER, 2)} if qwen else spec, cfg.hidden_size)  # stage 2's probes, kept consistent with its LLM; dropped after
    if args.phase == "joint" and args.aux > 0:
        load_checkpoint(args.language, {"probes": probes}, None)
        params += list(probes.parameters())
    groups_ = lr_groups(model, params, args.lr_scale) if args.phase == "joint" else [{"params": params}]
    opt = torch.optim.AdamW(groups_, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    last_dir = args.out / f"last-{args.phase}"
    start, elapsed, best = 0, 0.0, -1.0
    if args.resume and (last_dir / "meta.json").is_file():
        meta = load_checkpoint(last_dir, {"model": model, "probes": probes}, opt)
        start, elapsed, best = meta["step"], meta["elapsed_s"], meta["best"]
    targets: dict = {}
    terms: list[torch.Tensor] = []

    layers = model.model.language_model.layers
    handles = install_pointing(layers, POINT, targets, terms, groups)
    probes.install(layers)
    select = make_split("eval", args.select_n, SELECT_SEED)
    args.out.mkdir(parents=True, exist_ok=True)
    curve = (args.out / "curve.jsonl").open("a")
    gen = torch.Generator().manual_seed(args.seed + start)
    index = torch.arange(N_CELLS)
    t0, saved = time.time() - elapsed, time.time()
    model.train()
    for step in range(start, args.steps):
        packs, pixels = scenes_batch(args.seed, step, args.batch, args.questions, vocab, pack_fn)
        row = {"step": step}
        if args.phase == "project":
            cells = torch.stack([p.cells for p in packs])  # [B, 576, 5]
            with torch.no_grad():
                want = net.cell(cells, index)  # [B, 576, D]
            got = project(pixels)
            w = 0.2 + (cells[..., 4] > 0).float()
            loss = (((got - want) ** 2).mean(-1) * w).sum() / w.sum()
            row["mse"] = round(loss.item(), 4)
        else:
            ids, _, index_, is_cell, pos, mask, answers, point = collate(packs, 1.0, gen, 0.0)
            targets.update(point, mask=mask)
            if qwen:
                rows_, thw = qwen_patches(pixels)
                hidden = model.model(input_ids=ids, pixel_values=rows_, image_grid_thw=thw, attention_mask=mask,
                                     position_ids=pos.permute(2, 0, 1)).last_hidden_state  # fmt: skip
                aux = cellpos_loss(probes.outputs[CELLPOS_LAYER], index_, is_cell, probes.heads["cellpos"])
            else:
                hidden = model.model(input_ids=ids, pixel_values=pixels, attention_mask=mask, position_ids=pos).last_hidden_state
                aux = 0.0
            aux = aux + sum(probes.losses(point).values())
            targets.clear()
            bi = torch.cat([torch.full_like(a, i) for i, a in enumerate(answers)])
            rows = torch.cat([torch.cat(answers) - 1, torch.cat(answers)])
            qa = F.cross_entropy(model.lm_head(hidden[bi.repeat(2), rows]), ids[bi.repeat(2), rows + 1])
            pl = sum(terms) / max(len(terms), 1)
            terms.clear()
            loss = qa + args.point * pl + args.aux * aux
            row.update(qa=round(qa.item(), 4), point=round(float(pl), 4), aux=round(float(aux), 4))
        optimizer_step(opt, loss, params, lr_at(step, args.steps, args.lr, args.warmup))
        last = step == args.steps - 1
        row["elapsed_s"] = round(time.time() - t0)
        if (step % args.eval_every == 0 and step > 0) or last:
            model.eval()
            for h in handles:
                h.remove()
            res = evaluate(model, processor, select, batch_size=25)
            handles = install_pointing(layers, POINT, targets, terms, groups)
            model.train()
            row["select"] = {"acc": round(res["accuracy"], 4), "per_task": {t: round(v, 3) for t, v in res["per_task"].items()}}
            if res["accuracy"] > best:
                best = res["accuracy"]
                save_hf_folder(model, processor, args.out / "best")
        if step % 10 == 0 or "select" in row:
            curve.write(json.dumps(row) + "\n")
            curve.flush()
            print(json.dumps(row), flush=True)
        if args.snapshot_every and ((step + 1) % args.snapshot_every == 0 or last):
            save_hf_folder(model, processor, args.out / f"step-{step + 1}")
        if time.time() - saved > args.save_minutes * 60 or last:
            save_checkpoint(last_dir, {"model": model, "probes": probes}, opt, {"step": step + 1, "elapsed_s": time.time() - t0, "best": best})
            saved = time.time()


if __name__ == "__main__":
    main()
