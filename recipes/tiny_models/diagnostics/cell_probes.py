"""Linear probes (least squares, 2/3 train, 1/3 test) for colour and shape on object cells at the
inputs of layers 0-3 of a stage-2 tiny-llava checkpoint (ground-truth cell tokens).

    python -m recipes.tiny_models.diagnostics.cell_probes training/tiny-llava/language3/last
"""
import sys, torch, pathlib
from pruneware.evals.synthetic import make_split
from pruneware.models.build import build_tiny
from recipes.tiny_models.language import Stage2, VISION_SPEC
from recipes.tiny_models.common import load_checkpoint
from recipes.tiny_models.packing import collate, pack
torch.set_num_threads(1)
model, proc = build_tiny("llava", seed=0, vision=VISION_SPEC)
net = Stage2(model); load_checkpoint(pathlib.Path(sys.argv[1]), {"net": net}, None); net.eval()
vocab = proc.tokenizer.get_vocab()
ex = make_split("eval", 120, 777)
caps = {}
for L in range(4):
    net.lm.layers[L].register_forward_pre_hook(lambda m, a, kw, L=L: caps.__setitem__(L, kw["hidden_states"] if "hidden_states" in kw else a[0]), with_kwargs=True)
X = {L: [] for L in range(4)}; Y = []
for i in range(0, 120, 20):
    ch = ex[i:i+20]
    ids, cells, index, is_cell, pos, mask, answers, _ = collate([pack(e.scene, [(e.question, e.answer, e.task)], proc.tokenizer.get_vocab()) for e in ch], 1.0, torch.Generator(), 0.0)
    with torch.no_grad(): net(ids, cells, index, is_cell, pos, mask)
    obj = is_cell & (cells[..., 4] > 0)
    for L in range(4): X[L].append(caps[L][obj])
    Y.append(cells[obj][:, :2])
Y = torch.cat(Y)
for L in range(4):
    x = torch.cat(X[L]); n = len(x); tr = slice(0, n*2//3); te = slice(n*2//3, n)
    x1 = torch.cat([x, torch.ones(n, 1)], 1)
    for k, name in enumerate(["colour", "shape"]):
        oh = torch.nn.functional.one_hot(Y[:, k]).float()
        W = torch.linalg.lstsq(x1[tr], oh[tr]).solution
        acc = ((x1[te] @ W).argmax(1) == Y[te, k]).float().mean().item()
        print("layer", L, "input", name, "linear probe acc %.3f" % acc, "n", n)
