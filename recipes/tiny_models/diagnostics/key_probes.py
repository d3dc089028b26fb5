"""Linear probes for colour and shape on object cells, from the residual and from KV head 0's pre-RoPE keys at the
inputs of layers 0-4 (is the tally head's key side able to tell colours apart?). Held-out counting scenes, seed 5151.

    python -m recipes.tiny_models.diagnostics.key_probes tiny-llava
"""
import sys, torch, numpy as np
from pruneware.evals.synthetic import make_split
from pruneware.evals.synthetic.accuracy import build_prompt
from pruneware.evals.synthetic.scene import COLORS, SHAPES
from pruneware.models.grounding import cell_targets
from pruneware.models.loading import load_any
torch.set_num_threads(1)
model, proc = load_any(sys.argv[1], device="cpu"); model.eval()
layers = model.model.language_model.layers
caps = {}
for L in range(5):
    layers[L].register_forward_pre_hook(lambda m, a, kw, L=L: caps.__setitem__(L, (kw.get("hidden_states", a[0] if a else None))), with_kwargs=True)
ex = [e for e in make_split("eval", 400, 5151) if e.task == "counting"][:60]
X = {L: [] for L in range(5)}; K = {L: [] for L in range(5)}; col, shp = [], []
cidx = {c: i for i, c in enumerate(COLORS)}; sidx = {s: i for i, s in enumerate(SHAPES)}
for e in ex:
    inputs = proc(text=[build_prompt(proc, e.question)], images=[e.image], return_tensors="pt")
    with torch.no_grad(): model(**inputs)
    ids = inputs["input_ids"][0]; first = int((ids == model.config.image_token_id).nonzero()[0])
    owner = cell_targets(e.scene, 24)[:, 4] - 1
    on = (owner >= 0).nonzero().flatten()
    for L in range(5):
        h = caps[L][0, first + on]
        X[L].append(h)
        K[L].append(layers[L].self_attn.k_proj(layers[L].input_layernorm(h)).view(len(on), -1, 24)[:, 0])
    col += [cidx[e.scene.objects[o].color] for o in owner[on].tolist()]
    shp += [sidx[e.scene.objects[o].shape] for o in owner[on].tolist()]
col, shp = torch.tensor(col), torch.tensor(shp)
def fit(x, y, n):
    x = (x - x.mean(0)) / (x.std(0) + 1e-6); m = len(x) * 3 // 4
    lin = torch.nn.Linear(x.shape[1], n); opt = torch.optim.Adam(lin.parameters(), 0.05)
    for _ in range(300):
        opt.zero_grad(); torch.nn.functional.cross_entropy(lin(x[:m]), y[:m]).backward(); opt.step()
    return float((lin(x[m:]).argmax(-1) == y[m:]).float().mean())
with torch.no_grad(): pass
for L in range(5):
    x = torch.cat(X[L]).detach(); k = torch.cat(K[L]).detach()
    print(f"layer {L} input: colour from hidden {fit(x, col, 6):.3f}, from kv0 key {fit(k, col, 6):.3f}; shape from hidden {fit(x, shp, 5):.3f}, from kv0 key {fit(k, shp, 5):.3f}")
