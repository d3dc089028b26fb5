"""Per question kind accuracy of a tiny-llava stage-2 checkpoint (the LLM on ground-truth cell
tokens, all 576 cells), on a held-out eval split: the language model's share of the error.

    python -m recipes.tiny_models.diagnostics.stage2_kinds training/tiny-llava/language3/last 600 5151

Never use seed 0 (the reporting split) to choose anything.
"""
import collections, pathlib, sys

import torch

from pruneware.evals.synthetic import make_split
from pruneware.models.build import build_tiny
from recipes.tiny_models.common import load_checkpoint
from recipes.tiny_models.language import VISION_SPEC, Stage2
from recipes.tiny_models.packing import collate, pack

torch.set_num_threads(1)
model, proc = build_tiny("llava", seed=0, vision=VISION_SPEC)
net = Stage2(model)
load_checkpoint(pathlib.Path(sys.argv[1]), {"net": net}, None)
net.eval()
vocab = proc.tokenizer.get_vocab()
inv = {v: k for k, v in vocab.items()}
ex = make_split("eval", int(sys.argv[2]), int(sys.argv[3]))
kinds = collections.defaultdict(lambda: [0, 0])
for i in range(0, len(ex), 25):
    chunk = ex[i : i + 25]
    packs = [pack(e.scene, [(e.question, e.answer, e.task)], vocab) for e in chunk]
    with torch.no_grad():
        ids, cells, index, is_cell, pos, mask, answers, _ = collate(packs, 1.0, torch.Generator().manual_seed(0), 0.0)
        hidden = net(ids, cells, index, is_cell, pos, mask)
        pred = net.head(hidden[torch.arange(len(chunk)), torch.stack([a[0] - 1 for a in answers])]).argmax(-1)
    for e, p in zip(chunk, pred.tolist()):
        q = e.question
        k = {"attribute": "attr-color" if q.startswith("what color") else "attr-shape",
             "counting": "count-color" if "objects" in q else "count-shape"}.get(e.task, e.task)
        kinds[k][0] += inv[p] == e.answer
        kinds[k][1] += 1
total = sum(a for a, _ in kinds.values()) / len(ex)
print(sys.argv[1], f"all {total:.3f}", " ".join(f"{k} {a}/{n}={a / n:.2f}" for k, (a, n) in sorted(kinds.items())))
