"""Linear probe for the identity of a question's colour word, at that word's row, at the inputs of
layers 0-3 of a stage-2 tiny-llava checkpoint (the query side of colour-keyed attention).

    python -m recipes.tiny_models.diagnostics.colour_word_probes training/tiny-llava/language3/last
"""
import sys, torch, pathlib
from pruneware.evals.synthetic import make_split
from pruneware.evals.synthetic.scene import COLORS
from pruneware.models.build import build_tiny
from recipes.tiny_models.language import Stage2, VISION_SPEC
from recipes.tiny_models.common import load_checkpoint
from recipes.tiny_models.packing import collate, pack
torch.set_num_threads(1)
model, proc = build_tiny("llava", seed=0, vision=VISION_SPEC)
net = Stage2(model); load_checkpoint(pathlib.Path(sys.argv[1]), {"net": net}, None); net.eval()
vocab = proc.tokenizer.get_vocab(); cid = {vocab[c]: i for i, c in enumerate(COLORS)}
ex = [e for e in make_split("eval", 1500, 778) if any(c in e.question.split() for c in COLORS)]
caps = {}
for L in range(4):
    net.lm.layers[L].register_forward_pre_hook(lambda m, a, kw, L=L: caps.__setitem__(L, kw["hidden_states"] if "hidden_states" in kw else a[0]), with_kwargs=True)
X = {L: [] for L in range(4)}; Y = []
for i in range(0, len(ex), 25):
    ch = ex[i:i+25]
    ids, cells, index, is_cell, pos, mask, answers, _ = collate([pack(e.scene, [(e.question, e.answer, e.task)], vocab) for e in ch], 1.0, torch.Generator(), 0.0)
    with torch.no_grad(): net(ids, cells, index, is_cell, pos, mask)
    sel = torch.zeros_like(ids, dtype=torch.bool)
    for t in cid: sel |= (ids == t)
    sel &= ~is_cell
    for L in range(4): X[L].append(caps[L][sel])
    Y.append(torch.tensor([cid[int(t)] for t in ids[sel]]))
Y = torch.cat(Y); print("rows", len(Y))
for L in range(4):
    x = torch.cat(X[L]); n = len(x); tr = slice(0, n*2//3); te = slice(n*2//3, n)
    x1 = torch.cat([x, torch.ones(n, 1)], 1)
    oh = torch.nn.functional.one_hot(Y).float()
    W = torch.linalg.lstsq(x1[tr], oh[tr]).solution
    print("layer", L, "input: colour word identity probe %.3f" % ((x1[te] @ W).argmax(1) == Y[te]).float().mean().item(), "norm %.1f" % x.norm(dim=1).mean())
