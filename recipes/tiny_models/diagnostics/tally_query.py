"""Why the colour-keyed tally leaks: how sharply the tally head tells referents from other objects, and whether its
query knows which colour it was asked (held-out counting questions, seed 5151; never seed 0, the reporting split).

    python -m recipes.tiny_models.diagnostics.tally_query tiny-llava              # the shipped model, layer 3 head 1

Three readings of the head (the ``phrase_area`` tally head of ``--count-head --count-area`` models), each split
into colour questions ("how many red objects", read at the colour word as ``--count-at-colour`` trains it) and
shape questions ("how many stars", read at the plural noun):

1. *selectivity*: per question, the mean log attention (relative to the sink) on referent cells, on other objects'
   cells and on background cells, and the attention mass on the referents plus the sink (1 is a perfect tally);
2. *query-key match*: the head's query for each colour word and each plural noun (one image, every word) against
   the mean key of each colour's and each shape's object cells (40 scenes): the matching logit minus the mean of
   the others (0 means the query does not know which colour or shape it asked for), and the cosine between queries;
3. *where layer 0 puts the word*: at the colour words and the plural nouns, the norm of the mean and the spread
   around it of the embedding and of layer 0's attention and MLP outputs (a large shared vector with a small spread
   leaves the word's identity a small part of what later layers read).
"""
import sys

import numpy as np
import torch

from pruneware.evals.synthetic import make_split
from pruneware.evals.synthetic.accuracy import build_prompt
from pruneware.evals.synthetic.scene import COLORS, PLURALS, SHAPES
from pruneware.models.grounding import cell_targets, referents
from pruneware.models.loading import load_any

torch.set_num_threads(1)
model, proc = load_any(sys.argv[1], device="cpu")
model.set_attn_implementation("eager")
layer, head = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (3, 1)
lm = model.model.language_model
attn = lm.layers[layer].self_attn
kv = head // (model.config.text_config.num_attention_heads // model.config.text_config.num_key_value_heads)
d, image_id, tok = attn.head_dim, model.config.image_token_id, proc.tokenizer
seen = {}
attn.register_forward_pre_hook(lambda m, a, kw: seen.update(h=kw["hidden_states"] if "hidden_states" in kw else a[0]), with_kwargs=True)
lm.layers[0].register_forward_pre_hook(lambda m, a, kw: seen.update(emb=kw["hidden_states"] if "hidden_states" in kw else a[0]), with_kwargs=True)
lm.layers[0].self_attn.register_forward_hook(lambda m, a, out: seen.update(attn0=out[0]))
lm.layers[0].mlp.register_forward_hook(lambda m, a, out: seen.update(mlp0=out))


def run(image, question: str):
    """Forward one prompt; returns its input ids [L] and attentions (eager)."""
    inputs = proc(text=[build_prompt(proc, question)], images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    return inputs["input_ids"][0], out.attentions


def read_row(ids: torch.Tensor, question: str) -> int:
    """The row the tally is read at: the colour word, or the plural noun (the word before ``are``)."""
    words = tok.convert_ids_to_tokens(ids)
    return max(i for i, w in enumerate(words) if w == "are") - 1 - ("objects" in question)


examples = [e for e in make_split("eval", 600, 5151) if e.task == "counting"]
sel = {"colour": [], "shape": []}
for e in examples:
    ids, attentions = run(e.image, e.question)
    first, row = int((ids == image_id).nonzero()[0]), read_row(ids, e.question)
    a = attentions[layer][0, head, row]
    log_a = (a[first : first + 576] / a[0]).log()  # [576] log attention relative to the sink
    owner = cell_targets(e.scene, 24)[:, 4] - 1  # object per cell, -1 background
    is_ref = torch.isin(owner, torch.tensor(referents(e.scene, e.question)))
    other = (owner >= 0) & ~is_ref
    by = "colour" if "objects" in e.question else "shape"
    sel[by].append((float(log_a[is_ref].mean()), float(log_a[other].mean()) if other.any() else np.nan,
                    float(log_a[owner < 0].mean()), float(a[0] + a[first : first + 576][is_ref].sum())))  # fmt: skip
print(f"{sys.argv[1]}, layer {layer} head {head}")
for by, rows in sel.items():
    r = np.array(rows)
    print(f"1. {by} questions ({len(r)}): mean log(attention / sink) on referent cells {r[:, 0].mean():.2f}, other objects' cells"
          f" {np.nanmean(r[:, 1]):.2f}, background {r[:, 2].mean():.2f}; mass on referents + sink {r[:, 3].mean():.3f}")

words = {"colour": [(c, f"how many {c} objects are there?") for c in COLORS],
         "shape": [(PLURALS[s], f"how many {PLURALS[s]} are there?") for s in SHAPES]}  # fmt: skip
queries, parts = {}, {}
for by, pairs in words.items():
    for word, question in pairs:
        ids, _ = run(examples[0].image, question)
        row = read_row(ids, question)
        with torch.no_grad():
            queries.setdefault(by, []).append(attn.q_proj(seen["h"][0, row]).view(-1, d)[head])
        for part in ("emb", "attn0", "mlp0"):
            parts.setdefault((by, part), []).append(seen[part][0, row])
keys = {"colour": {c: [] for c in COLORS}, "shape": {s: [] for s in SHAPES}}
for e in examples[:40]:
    ids, _ = run(e.image, e.question)
    first = int((ids == image_id).nonzero()[0])
    with torch.no_grad():
        k = attn.k_proj(seen["h"][0, first : first + 576]).view(576, -1, d)[:, kv]  # [576, d] pre-RoPE keys
    owner = cell_targets(e.scene, 24)[:, 4] - 1
    for o, obj in enumerate(e.scene.objects):
        keys["colour"][obj.color].append(k[owner == o].mean(0))
        keys["shape"][obj.shape].append(k[owner == o].mean(0))
for by in ("colour", "shape"):
    q = torch.stack(queries[by])  # [n, d]
    k = torch.stack([torch.stack(v).mean(0) for v in keys[by].values()])  # [n, d]
    logits = q @ k.T * attn.scaling
    lead = logits.diag() - (logits.sum(1) - logits.diag()) / (len(q) - 1)
    unit = torch.nn.functional.normalize(q, dim=1)
    cos = (unit @ unit.T)[~torch.eye(len(q), dtype=torch.bool)]
    print(f"2. {by} queries: matching logit minus the others' mean {[round(float(x), 2) for x in lead]};"
          f" cosine between queries mean {cos.mean():.2f} (max {cos.max():.2f})")
for (by, part), vectors in parts.items():
    x = torch.stack(vectors)
    print(f"3. {by} words, layer 0 {part:5s}: norm of the mean {x.mean(0).norm():.2f}, spread around it {(x - x.mean(0)).norm(dim=1).mean():.2f}")
