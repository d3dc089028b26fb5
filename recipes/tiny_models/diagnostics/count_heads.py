"""Where a tiny-llava model's attention goes when it counts, on held-out counting questions (seed 5151).

    python -m recipes.tiny_models.diagnostics.count_heads tiny-llava 1000            # every head's share on the first token
    python -m recipes.tiny_models.diagnostics.count_heads tiny-llava 1000 3 1 colour   # models trained with --count-at-colour

Without a layer and head: for every layer and head, the mean attention that the counting phrase word
(``objects`` in "how many blue objects are there?") and the answering token put on the prompt's first
token (the sink), by true count 1..4; heads whose mean stays under 0.05 are not printed. With a layer and
head: that head's sink share at the phrase word by true count (mean, standard deviation, the ideal
``1 / (n + 1)``), the model's accuracy per count, and, per referent, the attention on its cells in
sink units (ideal 1: one centre cell per object, as much as the sink), overall and by the referent's shape.
With ``colour`` last, colour questions are read at their colour word (``--count-at-colour`` models).
Never use seed 0 (the reporting split).
"""
import collections
import sys

import numpy as np
import torch

from pruneware.evals.synthetic import make_split
from pruneware.evals.synthetic.accuracy import build_prompt
from pruneware.models.grounding import cell_targets, referents
from pruneware.models.loading import load_any

torch.set_num_threads(1)
model, proc = load_any(sys.argv[1], device="cpu")
model.set_attn_implementation("eager")
examples = [e for e in make_split("eval", int(sys.argv[2]), 5151) if e.task == "counting"]
head = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 4 else None
at_colour = sys.argv[-1] == "colour"
tok, image_id = proc.tokenizer, model.config.image_token_id
shares = collections.defaultdict(list)  # (row kind, layer) -> [(count, [heads] sink shares)]
detail, per_referent, other, where = [], [], [], []
NEIGHBOURS = {"red": ("orange", "purple"), "orange": ("red", "yellow"), "yellow": ("orange", "green"), "green": ("yellow", "blue"), "blue": ("green", "purple"), "purple": ("blue", "red")}


def asked_colour(example) -> str | None:
    """The colour a "how many red objects" question names (None for shape questions)."""
    return example.question.split()[2] if "objects" in example.question else None


for e in examples:
    inputs = proc(text=[build_prompt(proc, e.question)], images=[e.image], return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    ids = inputs["input_ids"][0]
    first = int((ids == image_id).nonzero()[0])
    words = tok.convert_ids_to_tokens(ids)
    phrase = max(i for i, w in enumerate(words) if w == "are") - 1
    if at_colour and "objects" in e.question:  # "how many red objects are there?": the colour word
        phrase -= 1
    refs = referents(e.scene, e.question)
    n = len(refs)
    if head is None:
        for kind, row in (("phrase", phrase), ("answer", len(ids) - 1)):
            for layer, attn in enumerate(out.attentions):
                shares[(kind, layer)].append((n, attn[0, :, row, 0].numpy()))
        continue
    attn = out.attentions[head[0]][0, head[1], phrase]  # [L]
    sink, cells = float(attn[0]), attn[first : first + 576]
    owner = cell_targets(e.scene, 24)[:, 4] - 1  # object index per cell, -1 background
    by = "colour question" if "objects" in e.question else "shape question"
    for r in refs:
        mass = cells[owner == r]
        per_referent.append((float(mass.sum()) / sink, int((mass > 0.3 * sink).sum()), e.scene.objects[r].shape, by))
    other.append((float(cells[~torch.isin(owner, torch.tensor(refs))].sum()) / sink, by))
    is_ref = torch.isin(owner, torch.tensor(refs)).view(1, 1, 24, 24).float()
    halo = (torch.nn.functional.max_pool2d(is_ref, 3, 1, 1) > 0).flatten() & (owner == -1)  # background next to a referent
    near_colour = torch.tensor([o >= 0 and e.scene.objects[o].color in NEIGHBOURS.get(asked_colour(e), ()) for o in owner.tolist()])
    where.append((by, *(float(cells[m].sum()) / sink for m in (halo, (owner == -1) & ~halo, (owner >= 0) & ~is_ref.flatten().bool() & near_colour, (owner >= 0) & ~is_ref.flatten().bool() & ~near_colour))))
    detail.append((n, sink, tok.decode(out.logits[0, -1].argmax()).strip() == e.answer))
if head is None:
    for (kind, layer), rows in sorted(shares.items()):
        counts, s = np.array([n for n, _ in rows]), np.stack([x for _, x in rows])
        for h in range(s.shape[1]):
            means = [float(s[counts == n, h].mean()) for n in range(1, 5)]
            if max(means) > 0.05:
                print(kind, "layer", layer, "head", h, "sink share by count 1..4:", [round(m, 3) for m in means])
    print("done:", len(examples), "counting questions")
else:
    for n in range(1, 5):
        s = [x for k, x, _ in detail if k == n]
        hit = [c for k, _, c in detail if k == n]
        print(f"count {n}: {len(s)} q., sink share {np.mean(s):.3f} sd {np.std(s):.3f} (ideal {1 / (n + 1):.3f}), accuracy {np.mean(hit):.2f}")
    r = np.array([x for x, *_ in per_referent])
    print(f"per referent, attention on its cells / sink: mean {r.mean():.2f} sd {r.std():.2f}; "
          f"referents with no cell above 0.3 x sink: {np.mean([c == 0 for _, c, *_ in per_referent]):.2f}; "
          f"non-referent cells / sink: mean {np.mean([x for x, _ in other]):.2f}")  # fmt: skip
    for by in ("colour question", "shape question"):
        m = [x for x, _, _, b in per_referent if b == by]
        rest = np.mean([x for x, b in other if b == by])
        print(f"  {by:15s} referents {len(m):4d}: attention on its cells / sink mean {np.mean(m):.2f} sd {np.std(m):.2f};"
              f" non-referent cells / sink per question {rest:.2f}")
    for by in ("colour question", "shape question"):
        w = np.array([x[1:] for x in where if x[0] == by]).mean(0)
        print(f"  {by:15s} non-referent mass / sink per question: background next to a referent {w[0]:.2f}, other background {w[1]:.2f},"
              f" objects of a neighbouring colour {w[2]:.2f}, other objects {w[3]:.2f}")
    for shape in sorted({s for _, _, s, _ in per_referent}):
        m = [x for x, _, s, _ in per_referent if s == shape]
        print(f"  {shape:9s} referents {len(m):4d}: attention on its cells / sink mean {np.mean(m):.2f} sd {np.std(m):.2f}")
