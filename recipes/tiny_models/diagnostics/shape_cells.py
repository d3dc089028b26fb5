"""How many of the 24 x 24 cells an object covers, by shape, on the objects of an eval split (no model).

    python -m recipes.tiny_models.diagnostics.shape_cells 600 5151   # counting questions, seed

A tally whose mass per object follows covered cells weighs a circle about three stars.
"""
import collections
import sys

import numpy as np

from pruneware.evals.synthetic import make_split
from pruneware.models.grounding import cell_objects

CELL_PX = 336 / 24
examples = make_split("eval", int(sys.argv[1]), int(sys.argv[2]), tasks=("counting",))
cells, per_r2 = collections.defaultdict(list), collections.defaultdict(list)
for e in examples:
    owner = cell_objects(e.scene, 24)  # [576], 0 = background, k + 1 = object k
    for k, o in enumerate(e.scene.objects):
        n = int((owner == k + 1).sum())
        cells[o.shape].append(n)
        per_r2[o.shape].append(n / (o.r / CELL_PX) ** 2)
print(f"{'shape':10s} {'objects':>7s} {'cells (mean)':>12s} {'cells / radius^2 (radius in cells)':>35s}")
for shape in sorted(cells):
    print(f"{shape:10s} {len(cells[shape]):7d} {np.mean(cells[shape]):12.1f} {np.mean(per_r2[shape]):35.2f}")
