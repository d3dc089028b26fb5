"""Attention mass that each pointing head puts on its targets, per question kind, for a stage-2
checkpoint of tiny-llava (ground-truth cell tokens): exp(-mean pointing loss) over 50 questions
of each kind from a held-out eval split (seed 5151).

    python -m recipes.tiny_models.diagnostics.pointing_mass training/tiny-llava/language3/last
"""
import sys, collections, torch, pathlib
from pruneware.evals.synthetic import make_split
from pruneware.models.build import build_tiny
from recipes.tiny_models.language import Stage2, VISION_SPEC, POINT
from recipes.tiny_models.common import load_checkpoint
from recipes.tiny_models.packing import collate, pack
from recipes.tiny_models.losses import install_pointing
torch.set_num_threads(1)
ex = make_split("eval", 600, 5151)
def qkind(e):
    q = e.question
    if e.task == "attribute": return "attr-color" if q.startswith("what color") else "attr-shape"
    if e.task == "counting": return "count-color" if "objects" in q else "count-shape"
    return e.task
groups = collections.defaultdict(list)
for e in ex: groups[qkind(e)].append(e)
model, proc = build_tiny("llava", seed=0, vision=VISION_SPEC)
net = Stage2(model); load_checkpoint(pathlib.Path(sys.argv[1]), {"net": net}, None); net.eval()
vocab = proc.tokenizer.get_vocab(); cfg = model.config.text_config
for kind, es in sorted(groups.items()):
    es = es[:50]
    res = collections.defaultdict(list)
    for name, lh in POINT.items():
        tg, terms = {}, []
        hs = install_pointing(net.lm.layers, {name: lh}, tg, terms, cfg.num_attention_heads // cfg.num_key_value_heads)
        with torch.no_grad():
            ids, cells, index, is_cell, pos, mask, answers, targets = collate([pack(e.scene, [(e.question, e.answer, e.task)], vocab) for e in es], 1.0, torch.Generator().manual_seed(0), 0.0)
            tg.update(targets, mask=mask); net(ids, cells, index, is_cell, pos, mask)
        for h in hs: h.remove()
        if terms: res[name] = round(float(torch.exp(-terms[0])), 3)
    print(kind, dict(res), flush=True)
