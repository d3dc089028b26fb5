"""Can a linear readout of a tiny-llava model's visual tokens (the LLM's inputs, [576, D] per image)
mark one cell per object, which an attention tally needs to count exactly?

    python -m recipes.tiny_models.diagnostics.centre_probe tiny-llava 300

Fits a logistic probe for ``grounding.cell_targets``' centre label (the cell holding an object's
centre) on 2/3 of ``n`` random train-space scenes (generator seed 777), and reports on the rest: the
probe's recall and precision, and per object its summed centre probability over the object's cells
(ideal exactly 1; a tally over centres counts right only if this is near 1 for every referent).
"""
import sys, numpy as np, torch
from pruneware.evals.synthetic.scene import sample_scene, render
from pruneware.models.grounding import cell_targets
from pruneware.models.loading import load_any
torch.set_num_threads(1)
model, proc = load_any(sys.argv[1], device="cpu")
n = int(sys.argv[2]) if len(sys.argv) > 2 else 300
rng = np.random.default_rng(777)
X, Y = [], []
for i in range(n):
    sc = sample_scene(rng, int(rng.integers(3, 8)))
    img = render(sc)
    pix = proc.image_processor(images=[img], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        f = model.get_image_features(pixel_values=pix)
    f = f[0] if isinstance(f, (list, tuple)) else f
    f = getattr(f, "pooler_output", f)
    f = f[0] if isinstance(f, (list, tuple)) else f
    X.append(f.reshape(576, -1).float()); Y.append(cell_targets(sc, 24))
X = torch.stack(X); Y = torch.stack(Y)  # [n,576,D], [n,576,5]
tr, te = slice(0, 2 * n // 3), slice(2 * n // 3, n)
mu, sd = X[tr].mean((0, 1)), X[tr].std((0, 1)) + 1e-6
Z = (X - mu) / sd
w = torch.zeros(Z.shape[-1] + 1, requires_grad=True)
opt = torch.optim.LBFGS([w], max_iter=300)
def loss():
    opt.zero_grad()
    lg = Z[tr] @ w[:-1] + w[-1]
    l = torch.nn.functional.binary_cross_entropy_with_logits(lg, Y[tr][..., 3].float()) + 1e-4 * (w ** 2).sum()
    l.backward(); return l
opt.step(loss)
with torch.no_grad():
    p = torch.sigmoid(Z[te] @ w[:-1] + w[-1])
yt, obj = Y[te][..., 3], Y[te][..., 4]
pred = p > 0.5
print(f"centre probe on {n - 2*n//3} test scenes: recall {pred[yt==1].float().mean():.3f}, precision {yt[pred].float().mean():.3f}")
mass = []
for s in range(p.shape[0]):
    for k in range(1, int(obj[s].max()) + 1):
        mass.append(float(p[s][obj[s] == k].sum()))
mass = np.array(mass)
print(f"per object, summed centre probability: mean {mass.mean():.2f} sd {mass.std():.2f}; within 0.5 of 1: {np.mean(np.abs(mass-1)<0.5):.2f}")
