"""The numbers a model card states beside its bar test, for one shipped or candidate model.

    python -m recipes.tiny_models.diagnostics.bar_facts tiny-llava

Prints the eight hand-made questions it gets wrong (`tests/test_models.py`) and its accuracy on
`make_split("eval", 150, seed=31337)` unpruned and keeping 2% of its visual tokens at random before
the LLM (`tests/test_sensitivity.py`, which asks for a drop of at least 20 points).
"""
import sys

import torch

import pruneware
from pruneware.evals.synthetic import evaluate, fixed_examples, make_split
from pruneware.models.loading import load_any

torch.set_num_threads(1)
model, processor = load_any(sys.argv[1], device="cpu")
fixed = fixed_examples()
res = evaluate(model, processor, fixed, batch_size=8)
print("hand-made questions wrong:", [(e.question, p) for e, p in zip(fixed, res["predictions"]) if p != e.answer])
examples = make_split("eval", 150, seed=31337)
base = evaluate(model, processor, examples, batch_size=25)["accuracy"]
with pruneware.prune(model, "random@pre:0.02", seed=0):
    pruned = evaluate(model, processor, examples, batch_size=25)["accuracy"]
print(f"sensitivity split: unpruned {base:.3f}, 2% random {pruned:.3f}, drop {100 * (base - pruned):.0f} points")
