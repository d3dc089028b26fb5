"""Where an embedded model's counting answers go wrong: accuracy of counting questions split by
the true count, the number of objects in the scene, the colour asked, the count by how the question
names the referents, the referents' sizes and how close their centres lie to a cell border (where the "centre
cell" is ambiguous), on a held-out split.

    python -m recipes.tiny_models.diagnostics.counting_errors tiny-llava 600 5151 2   # model, n, seed, threads

Never use seed 0 (the reporting split) to choose anything.
"""
import collections
import sys

import numpy as np
import torch

from pruneware.evals.synthetic import evaluate, make_split
from pruneware.evals.synthetic.scene import IMAGE_SIZE
from pruneware.models.grounding import referents
from pruneware.models.loading import load_any

WORDS = {"one": 1, "two": 2, "three": 3, "four": 4}
torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 1)
model, proc = load_any(sys.argv[1], device="cpu")
examples = make_split("eval", int(sys.argv[2]), int(sys.argv[3]), tasks=("counting",))
res = evaluate(model, proc, examples, 25)
cell = IMAGE_SIZE / 24
rows = []
for e, p in zip(examples, res["predictions"]):
    objs = [e.scene.objects[i] for i in referents(e.scene, e.question)]
    edge = np.mean([0.5 - max(abs((o.x / cell) % 1 - 0.5), abs((o.y / cell) % 1 - 0.5)) for o in objs])
    rows.append({
        "ok": p == e.answer, "count": len(objs), "pred": WORDS.get(p, 0), "scene": len(e.scene.objects),
        "by": "colour" if "objects" in e.question else "shape",
        "colour": e.question.split()[2] if "objects" in e.question else "-",
        "edge": edge,  # referent centres' mean distance to a cell border, in cells (0 = on it)
        "rmin": min(o.r for o in objs), "rspread": max(o.r for o in objs) - min(o.r for o in objs),
    })
print(sys.argv[1], "counting accuracy", res["accuracy"], "n", len(rows))


def table(name, key):
    groups = collections.defaultdict(list)
    for r in rows:
        groups[key(r)].append(r)
    print(f"-- by {name}")
    for k in sorted(groups):
        g = groups[k]
        over = sum(r["pred"] > r["count"] for r in g)
        under = sum(0 < r["pred"] < r["count"] for r in g)
        print(f"  {k!s:>10}: {np.mean([r['ok'] for r in g]):.2f} of {len(g):3d}  (over {over}, under {under})")


table("true count", lambda r: r["count"])
table("objects in scene", lambda r: r["scene"])
table("asked by", lambda r: r["by"])
table("colour asked (colour questions)", lambda r: r["colour"])
table("how asked and true count (a colour's referents all differ in shape)", lambda r: f"{r['by']}-{r['count']}")
table("referents' mean border distance (cells)", lambda r: round(min(r["edge"], 0.49) // 0.1 * 0.1, 1))
table("smallest referent radius (px)", lambda r: int(r["rmin"] // 5 * 5))
table("referent radius spread (px)", lambda r: int(min(r["rspread"], 19.9) // 5 * 5))
