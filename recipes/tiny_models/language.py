"""Stage 2: the language model alone, answering questions over ground-truth visual tokens.

    python -m recipes.tiny_models.language --out training/tiny-llava/language --steps 3000

Each of the 576 image cells enters the LLM as a learned embedding of its labels (colour,
shape, glyph and centre of the object under it, from ``cell_targets``) plus a learned row and
column embedding: the tokens a perfect vision tower and projector would produce. Stage 3 then
teaches the real tower's projector to produce them. What makes this learn on a CPU:

* background dropping: early on only object cells and 5% of the background enter (original
  positions kept), so each question word's attention starts on the objects; the background
  comes back on a ramp that ends well before the end, so counting is learned on all cells;
* task-specific pointing targets: head 0 of layer 2 attends from the last word of each noun
  phrase to its objects; head 0 of layer 5 from the answering token to the glyph cells (glyph
  questions), the object centres (counting), the first object (spatial) or the referents;
  head 1 of layer 5 to the second object of a spatial question; head 2 of layer 4 to the
  relation word (left, right, above, below), which otherwise never reaches the answering row
  (linear probes read the relation there at chance, 0.26-0.42 for 4 classes, after 2,800 steps);
  with ``--count-head``, head 1 of layer 3 spreads a counting phrase word's attention equally
  over its objects' centre cells and the prompt's first token, whose share is then the count's
  code ``1 / (n + 1)``;
* linear probes on the answering row that spell out the steps of a spatial or counting answer
  (``PROBES``, dropped after training): which relation the question asks (layer 4), where
  both objects are (layer 5, ``--where``), how far the relation holds, whose sign is the
  answer, and the count (layer 6, ``--aux``);
* label noise on the cell labels, so the LLM tolerates the vision tower's mistakes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pruneware.evals.synthetic import TASKS, make_split
from pruneware.models.grounding import HEADS
from .vision import VISION_SPEC

from .common import SELECT_SEED, load_checkpoint, lr_at, optimizer_step, sample, save_checkpoint, train_seed
from .losses import Probes, install_pointing, set_point_weights
from .packing import GRID, bg_keep, collate, pack, questions, use_count_area, use_count_at_colour, use_count_contrast, use_count_groups, use_count_head, use_count_spread, use_count_via
from .qwen_vision import use_qwen_rope

SCENE_MIX = {"existence": 1.0, "attribute": 1.0, "counting": 5.0, "spatial": 1.0, "glyph": 1.0}
QUESTION_MIX = {"existence": 0.8, "attribute": 1.0, "counting": 1.3, "spatial": 1.5, "glyph": 1.0}
POINT = {  # pointing kind -> (layer, head)
    "noun": (2, 0), "object": (2, 0), "relation": (4, 2), "answer": (5, 0), "second": (5, 1), "tally": (5, 0),
    "adjective": (1, 0), "via": (4, 0), "phrase_tally": (3, 1),
    "phrase_groups": (3, 1), "phrase_area": (3, 1), "phrase_contrast": (3, 1),
}  # fmt: skip
AREA_PROBE = (2, 1)  # --count-area: layer and width of the object-size probe on the cells (read by the tally head at layer 3)
PROBES = {"rel": (4, 4), "where": (5, 4), "order": (6, 1), "count": (6, 1), "lookup": (3, 5), "phrase_count": (3, 1)}  # kind -> (layer, width)


class CellEmbedding(torch.nn.Module):
    """Visual tokens [B, 576, D] from cell labels [B, 576, 5]: a sum of learned embeddings."""

    def __init__(self, dim: int):
        super().__init__()
        sizes = list(HEADS.values())  # colour, shape, glyph, centre (0 = background / none)
        self.labels = torch.nn.ModuleList(torch.nn.Embedding(n, dim) for n in sizes)
        self.row = torch.nn.Embedding(GRID, dim)
        self.col = torch.nn.Embedding(GRID, dim)
        for e in [*self.labels, self.row, self.col]:
            torch.nn.init.normal_(e.weight, std=0.5)
        with torch.no_grad():  # an ordinal direction per axis: "left of" is a comparison along it
            ramp = torch.linspace(-3.0, 3.0, GRID)[:, None]  # [24, 1]
            for e in (self.row, self.col):
                u = torch.randn(dim)
                e.weight += ramp * u / u.norm()

    def forward(self, cells: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``cells`` [..., 5] labels, ``index`` [...] cell index in [0, 576): [..., D]."""
        out = self.row(index // GRID) + self.col(index % GRID)
        return out + sum(e(cells[..., k]) for k, e in enumerate(self.labels))


class Stage2(torch.nn.Module):
    """The LLM of a tiny LLaVA fed by :class:`CellEmbedding` instead of a vision tower."""

    def __init__(self, model):
        super().__init__()
        self.lm, self.head = model.model.language_model, model.lm_head
        self.cell = CellEmbedding(model.config.text_config.hidden_size)

    def forward(self, ids, cells, index, is_cell, pos, mask) -> torch.Tensor:
        """Final hidden states [B, L, D] (apply ``self.head`` to the rows you need)."""
        x = torch.where(is_cell[..., None], self.cell(cells, index), self.lm.embed_tokens(ids))
        return self.lm(inputs_embeds=x, attention_mask=mask, position_ids=pos).last_hidden_state


def apply_mix(text: str, table: dict[str, float] = QUESTION_MIX, option: str = "--mix") -> None:
    """Override ``table`` (default ``QUESTION_MIX``) from ``"counting=2.5,spatial=1"``: the
    ``--mix`` option, and ``--scene-mix`` (``SCENE_MIX``) and ``--count-accept``
    (``packing.COUNT_ACCEPT``, the share of counting questions kept per answer) of ``assemble``."""
    for item in filter(None, text.split(",")):
        key, _, weight = item.partition("=")
        if key not in table:
            raise SystemExit(f"{option}: unknown key {key!r}; valid keys: {list(table)}")
        table[key] = float(weight)


def train_batch(tag: str, seed: int, step: int, size: int, per_image: int, vocab: dict[str, int], pack_fn=pack):
    """``(packs, scenes)``: ``size`` packed train samples of stage ``tag`` and their scenes
    (``pack_fn``: the prompt layout, :func:`packing.pack` or ``qwen_language.pack_qwen``)."""
    names, p = list(SCENE_MIX), np.array(list(SCENE_MIX.values()))
    out, scenes = [], []
    for i in range(size):
        s = train_seed(tag, seed, step, i)
        task = str(np.random.default_rng(s + 1).choice(names, p=p / p.sum()))
        scene, rng = sample(s, task, 6)
        qas = questions(scene, rng, per_image, QUESTION_MIX)
        if qas:
            out.append(pack_fn(scene, qas, vocab))
            scenes.append(scene)
    return out, scenes


@torch.no_grad()
def select_accuracy(net: Stage2, examples, vocab: dict[str, int], batch: int = 25, pack_fn=pack) -> dict:
    """Greedy first-answer-token accuracy on one-question prompts with all 576 cells."""
    inv = {v: k for k, v in vocab.items()}
    hits: dict[str, list[bool]] = {t: [] for t in TASKS}
    gen = torch.Generator().manual_seed(0)
    for i in range(0, len(examples), batch):
        chunk = examples[i : i + batch]
        packs = [pack_fn(e.scene, [(e.question, e.answer, e.task)], vocab) for e in chunk]
        ids, cells, index, is_cell, pos, mask, answers, _ = collate(packs, 1.0, gen, 0.0)
        hidden = net(ids, cells, index, is_cell, pos, mask)
        rows = torch.stack([a[0] - 1 for a in answers])
        pred = net.head(hidden[torch.arange(len(chunk)), rows]).argmax(-1)
        for e, p in zip(chunk, pred.tolist(), strict=True):
            hits[e.task].append(inv[p] == e.answer)
    per = {t: round(sum(v) / len(v), 3) for t, v in hits.items() if v}
    return {"acc": round(sum(sum(v) for v in hits.values()) / len(examples), 4), "per_task": per}


def add_recipe_switches(ap: argparse.ArgumentParser) -> None:
    """The options stages 2 and 3 share: counting's pointing targets and Qwen's RoPE settings."""
    ap.add_argument("--count-spread", action="store_true", help="counting points at the centres and the sink with equal shares")
    ap.add_argument("--count-via", action="store_true", help="counting: the noun phrase counts, the answer reads it there")
    ap.add_argument("--count-head", action="store_true", help="counting: head 1 of layer 3 tallies at the noun phrase (equal shares, centres + sink)")
    ap.add_argument("--count-groups", action="store_true", help="with --count-head: an equal share per referent object (all its cells) and the sink, not per centre cell")
    ap.add_argument("--count-area", action="store_true", help="with --count-head: each referent's share spread evenly over its cells, plus an object-size probe on the cells")
    ap.add_argument("--count-contrast", action="store_true", help="with --count-area: each referent's mean attention logit must beat each other object's by a margin")
    ap.add_argument("--count-at-colour", action="store_true", help="counting by colour counts at the colour word, not at 'objects'")
    ap.add_argument("--rope-theta", type=float, help="qwen2.5-vl: the LLM's RoPE base (default 1000; runs before 2026-12-02 used 1e6)")
    ap.add_argument("--mrope", help="qwen2.5-vl: M-RoPE sections t,h,w in rotary pairs (default 1,2,9; before: 4,4,4)")


def apply_recipe_switches(args: argparse.Namespace) -> None:
    """Put the options of :func:`add_recipe_switches` in force for this process."""
    use_count_spread(args.count_spread)
    use_count_via(args.count_via)
    use_count_head(args.count_head)
    if args.count_groups and not args.count_head:
        raise SystemExit("--count-groups needs --count-head (it changes the tally head's target)")
    use_count_groups(args.count_groups)
    if args.count_area and not args.count_head:
        raise SystemExit("--count-area needs --count-head (it changes the tally head's target)")
    if args.count_area and args.count_groups:
        raise SystemExit("--count-area and --count-groups are two targets for the same head; choose one")
    use_count_area(args.count_area)
    if args.count_contrast and not args.count_area:
        raise SystemExit("--count-contrast needs --count-area (its referents are the area target's groups)")
    use_count_contrast(args.count_contrast)
    use_count_at_colour(args.count_at_colour)
    use_qwen_rope(args.rope_theta, args.mrope)


def main(argv: list[str] | None = None) -> None:
    from pruneware.models.build import build_tiny

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--questions", type=int, default=12, help="questions packed per image")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--point", type=float, default=0.5, help="weight of the pointing loss")
    ap.add_argument("--label-noise", type=float, default=0.05)
    ap.add_argument("--where", type=float, default=0.0, help="weight of the spatial whereabouts loss")
    ap.add_argument("--aux", type=float, default=0.0, help="weight of the relation / order / count probes")
    ap.add_argument("--init", type=Path, help="start from this checkpoint's weights (fresh optimizer, all cells from step 0)")
    ap.add_argument("--arch", choices=["llava", "qwen2.5-vl"], default="llava")
    ap.add_argument("--transfer", type=Path, help="qwen2.5-vl: start from this tiny-llava stage-2 checkpoint (all cells from step 0)")
    ap.add_argument("--cellpos", type=float, default=1.0, help="qwen2.5-vl: weight of the cell-position probe")
    ap.add_argument("--mix", default="", help="question-mix overrides, e.g. counting=2.5,spatial=1")
    ap.add_argument("--point-weights", default="", help="per-kind pointing weights, e.g. object=10")
    add_recipe_switches(ap)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--save-minutes", type=float, default=4.0)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    apply_mix(args.mix)
    apply_recipe_switches(args)
    set_point_weights(args.point_weights, POINT)
    qwen = args.arch == "qwen2.5-vl"
    if qwen:
        from . import qwen_language as ql
        from .qwen_vision import build_qwen

        model, processor = build_qwen(args.seed)
    else:
        model, processor = build_tiny("llava", seed=args.seed, vision=VISION_SPEC)
    pack_fn = ql.pack_qwen if qwen else pack
    vocab = processor.tokenizer.get_vocab()
    torch.manual_seed(args.seed)
    net = (ql.Stage2Qwen(model) if qwen else Stage2(model)).train()
    cfg = model.config.text_config
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    spec = {**PROBES, "area": AREA_PROBE} if args.count_area else PROBES
    spec = {**spec, "cellpos": (ql.CELLPOS_LAYER, 2)} if qwen else spec
    probes = Probes(spec, cfg.hidden_size)  # dropped after training
    modules = {"net": net, "probes": probes}
    params = [*net.parameters(), *probes.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    start, elapsed, best = 0, 0.0, -1.0
    if args.init is not None:
        load_checkpoint(args.init, modules, None)
    if args.transfer is not None:
        llava_vocab = build_tiny("llava", vision=VISION_SPEC)[1].tokenizer.get_vocab()
        ql.transfer_from_llava(net, probes, args.transfer, vocab, llava_vocab)
    if args.resume and (args.out / "last" / "meta.json").is_file():
        meta = load_checkpoint(args.out / "last", modules, opt)
        start, elapsed, best = meta["step"], meta["elapsed_s"], meta["best"]
        print(f"resumed at step {start}", flush=True)
    batch_targets: dict = {}
    terms: list[torch.Tensor] = []

    install_pointing(net.lm.layers, POINT, batch_targets, terms, groups)

    probes.install(net.lm.layers)
    select = make_split("eval", 250, SELECT_SEED)
    args.out.mkdir(parents=True, exist_ok=True)
    curve = (args.out / "curve.jsonl").open("a")
    gen = torch.Generator().manual_seed(args.seed * 1000 + start)
    t0, saved = time.time() - elapsed, time.time()
    for step in range(start, args.steps):
        packs, _ = train_batch("language", args.seed, step, args.batch, args.questions, vocab, pack_fn)
        keep = 1.0 if args.init is not None or args.transfer is not None else bg_keep(step, args.steps)
        ids, cells, index, is_cell, pos, mask, answers, targets = collate(packs, keep, gen, args.label_noise)
        batch_targets.update(targets, mask=mask)
        hidden = net(ids, cells, index, is_cell, pos, mask)
        if qwen:
            cellpos = ql.cellpos_loss(probes.outputs[ql.CELLPOS_LAYER], index, is_cell, probes.heads["cellpos"])
        probe = probes.losses(targets)
        if qwen:
            probe["cellpos"] = cellpos
        where = probe["where"]
        aux = sum(v for k, v in probe.items() if k not in ("where", "cellpos"))
        batch_targets.clear()
        bi = torch.cat([torch.full_like(a, i) for i, a in enumerate(answers)])
        ai = torch.cat(answers)
        rows = torch.cat([ai - 1, ai])  # predict the answer, then the end of turn
        logits = net.head(hidden[bi.repeat(2), rows])
        loss_qa = F.cross_entropy(logits, ids[bi.repeat(2), rows + 1])
        point = sum(terms) / max(len(terms), 1)
        terms.clear()
        loss = loss_qa + args.point * point + args.where * where + args.aux * aux
        if qwen:
            loss = loss + args.cellpos * probe["cellpos"]
        optimizer_step(opt, loss, params, lr_at(step, args.steps, args.lr, args.warmup))
        last = step == args.steps - 1
        if step % 25 == 0 or last:
            row = {"step": step, "qa": round(loss_qa.item(), 4), "point": round(float(point), 4), "probes": {k: round(v.item(), 3) for k, v in probe.items()},
                   "bg": round(keep, 3), "len": ids.shape[1], "elapsed_s": round(time.time() - t0)}  # fmt: skip
            if (step % args.eval_every == 0 and step > 0) or last:
                net.eval()
                row["select"] = select_accuracy(net, select, vocab, pack_fn=pack_fn)
                net.train()
                if row["select"]["acc"] > best:
                    best = row["select"]["acc"]
                    save_checkpoint(args.out / "best", modules, opt, {"step": step + 1, "elapsed_s": time.time() - t0, "best": best})
            curve.write(json.dumps(row) + "\n")
            curve.flush()
            print(json.dumps(row), flush=True)
        if time.time() - saved > args.save_minutes * 60 or last:
            save_checkpoint(args.out / "last", modules, opt, {"step": step + 1, "elapsed_s": time.time() - t0, "best": best})
            saved = time.time()


if __name__ == "__main__":
    main()
