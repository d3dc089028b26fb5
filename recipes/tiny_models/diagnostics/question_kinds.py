"""Per question kind (attribute by colour / by shape, counting by colour / by shape, ...) accuracy and
the commonest confusions of an embedded model or checkpoint folder, on a held-out eval split.

    python -m recipes.tiny_models.diagnostics.question_kinds tiny-llava 1000 5151 2   # model, n, seed, threads

Never use seed 0 (the reporting split) to choose anything.
"""
import sys, collections, torch
from pruneware.evals.synthetic import evaluate, make_split
from pruneware.models.loading import load_any
torch.set_num_threads(int(sys.argv[4]) if len(sys.argv)>4 else 1)
model, proc = load_any(sys.argv[1], device="cpu")
ex = make_split("eval", int(sys.argv[2]), int(sys.argv[3]))
res = evaluate(model, proc, ex, 25)
print(sys.argv[1], res["accuracy"], res["per_task"])
kinds = collections.defaultdict(lambda: [0,0]); conf = collections.Counter()
for e,p in zip(ex, res["predictions"]):
    q = e.question
    if e.task=="attribute": k = "attr-color" if q.startswith("what color") else "attr-shape"
    elif e.task=="counting": k = "count-shape" if "objects" not in q else "count-color"
    elif e.task=="spatial": k = "spatial-"+e.answer
    elif e.task=="existence": k="exist-"+e.answer
    else: k = e.task
    kinds[k][0]+= p==e.answer; kinds[k][1]+=1
    if p!=e.answer and e.task in ("attribute","counting","glyph"): conf[(e.task, e.answer, p)]+=1
for k,(a,n) in sorted(kinds.items()): print(f"{k:14s} {a}/{n} = {a/n:.2f}")
print(conf.most_common(25))
