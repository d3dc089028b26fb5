"""Can one layer-2 head of a stage-2 tiny-llava checkpoint represent colour-keyed pointing (from a
colour word to the objects of that colour)? Fits only that head's query and key rows on fixed
layer-2 inputs of NB-1 packed train batches and reports the attention mass on a held-out batch.

    python -m recipes.tiny_models.diagnostics.fit_pointing_head training/tiny-llava/language3/last 2 3e-3 301 16
    #                                                  checkpoint                        head lr  steps batches
"""
import sys, torch, pathlib
from pruneware.models.build import build_tiny
from recipes.tiny_models.language import Stage2, VISION_SPEC, train_batch
from recipes.tiny_models.common import load_checkpoint
from recipes.tiny_models.packing import collate
from recipes.tiny_models import packing
from recipes.tiny_models.losses import point_loss
from pruneware.evals.synthetic.scene import COLORS
torch.set_num_threads(1); torch.manual_seed(0)
model, proc = build_tiny("llava", seed=0, vision=VISION_SPEC)
net = Stage2(model); load_checkpoint(pathlib.Path(sys.argv[1]), {"net": net}, None); net.eval()
vocab = proc.tokenizer.get_vocab()
orig = packing.pointing
def with_hue(scene, cells, q, task):
    out = orig(scene, cells, q, task)
    for i, w in enumerate(q.replace("?", " ?").split()):
        if w in COLORS: out[f"hue@{i}"] = packing._cells_of(cells, [k for k, o in enumerate(scene.objects) if o.color == w], "object")
    return out
packing.pointing = with_hue
packing.POINT_KINDS = packing.POINT_KINDS + ("hue",)
attn = net.lm.layers[2].self_attn; head = int(sys.argv[2])
cap = {}
h = attn.register_forward_pre_hook(lambda m, a, kw: cap.update(a=a, kw=kw), with_kwargs=True)
batches = []
NB = int(sys.argv[5]) if len(sys.argv) > 5 else 3
for step in range(NB):
    packs, _ = train_batch("fitqk", 0, step, 8, 12, vocab)
    ids, cells, index, is_cell, pos, mask, answers, t = collate(packs, 1.0, torch.Generator(), 0.0)
    with torch.no_grad(): net(ids, cells, index, is_cell, pos, mask)
    kw = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in cap["kw"].items()}
    kw["attention_mask"] = mask
    kw["position_embeddings"] = tuple(x.detach() for x in kw["position_embeddings"])
    batches.append((kw, t["hue"], t["noun"]))
h.remove()
for p in net.parameters(): p.requires_grad_(False)
attn.q_proj.weight.requires_grad_(True); attn.k_proj.weight.requires_grad_(True)
opt = torch.optim.Adam([attn.q_proj.weight, attn.k_proj.weight], lr=float(sys.argv[3]))
for it in range(int(sys.argv[4])):
    kw, hue, noun = batches[it % (NB - 1)]
    loss = point_loss(attn, (), kw, head, hue, 2)
    opt.zero_grad(); loss.backward(); opt.step()
    if it % 25 == 0:
        with torch.no_grad():
            kw, hue, noun = batches[NB - 1]
            print(it, "train %.3f" % loss.item(), "held-out hue mass %.3f" % torch.exp(-point_loss(attn, (), kw, head, hue, 2)).item(), "noun mass (head 0) %.3f" % torch.exp(-point_loss(attn, (), kw, 0, noun, 2)).item(), flush=True)
