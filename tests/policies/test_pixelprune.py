"""`pixelprune` (PixelPrune's LOCO-I rule, `pruneware/policies/pixelprune.py`) against the rule
rebuilt from the official `pred_2d.py` as a plain per-unit loop, and end to end at `pre-vit`."""

from __future__ import annotations

import pytest
import torch

import pruneware
from pruneware.policies.pixelprune import loco_anchors
from tests.engine.test_vit_stages import _logits, _model, _reference_check
from tests.tiny import qwen_inputs


def official_rule(g: torch.Tensor, method: str, threshold: float, anchored: bool) -> torch.Tensor:
    """[h, w] bool anchors: the official selector, unit by unit (its `_select_2d_loco_anchored`;
    with anchored=False, the sliding comparison against the original neighbours)."""
    def sim(x, y):
        d = (x - y).abs()
        dist = {"exact": d.max(), "max": d.max(), "mae": d.mean(), "rmse": d.pow(2).mean().sqrt()}[method]
        return bool(dist <= (0.0 if method == "exact" else threshold))

    h, w, _ = g.shape
    src = g.clone()
    keep = torch.zeros(h, w, dtype=torch.bool)
    keep[0, 0] = True
    for r in range(h):
        for c in range(w):
            if r == 0 and c == 0:
                continue
            a = src[r, c - 1] if c > 0 else src[r - 1, 0]
            b = src[r - 1, c] if r > 0 else a
            cc = src[r - 1, c - 1] if r > 0 and c > 0 else b
            pred = b if (r > 0 and c > 0 and sim(cc, a) and not sim(cc, b)) else a
            if not sim(g[r, c], pred):
                keep[r, c] = True
            elif anchored:
                src[r, c] = pred
    return keep


def _document(h: int, w: int, seed: int) -> torch.Tensor:
    """[h, w, 8] a page: a flat background, two flat rectangles, a few noisy units, small jitter."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.zeros(h, w, 8)
    grid[1:4, 2:6] = 1.0
    grid[3:7, 5:7] = -0.5
    grid[torch.rand(h, w, generator=g) < 0.15] = torch.randn(8, generator=g)
    return grid + 0.01 * (torch.rand(h, w, 8, generator=g) < 0.1)


@pytest.mark.parametrize(("method", "threshold"), [("exact", 0.0), ("max", 0.0), ("max", 0.02), ("mae", 0.005),
                                                   ("rmse", 0.01)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_anchors_equal_the_official_rule(method, threshold, seed):
    grid = _document(7, 9, seed)
    keep, _ = loco_anchors(grid, method, threshold)
    anchored = not (method == "exact" or (method == "max" and threshold == 0))
    assert torch.equal(keep, official_rule(grid, method, threshold, anchored))
    assert 1 <= int(keep.sum()) < grid.shape[0] * grid.shape[1]


def test_flat_rectangles_keep_only_their_corners():
    grid = torch.zeros(6, 6, 4)
    grid[2:5, 1:4] = 1.0
    keep, _ = loco_anchors(grid)
    # the page's first unit, the rectangle's top-left, where the background resumes right of and below it
    assert keep.nonzero().tolist() == [[0, 0], [2, 1], [2, 4], [5, 1]]


def test_pre_vit_drops_duplicate_units_end_to_end():
    model = _model("qwen2.5-vl")
    inputs = qwen_inputs(model, [(3, [(8, 12)], 4)])
    pixels = inputs["pixel_values"].view(4, 6, 4, -1)  # [units high, units wide, 2x2 patches, patch]
    pixels[:, 1:] = pixels[:, :1]  # every row of units repeats its first unit
    inputs["pixel_values"] = pixels.reshape(96, -1)
    report = _reference_check(model, inputs, "pixelprune@pre-vit:1.0")
    assert report.stages[0].n_after == [4]  # one unit per row of units
    _, capped = _logits(model, inputs, "pixelprune@pre-vit:2")
    assert capped.stages[0].n_after == [2]


def test_bad_parameters_and_places_are_refused():
    model = _model("qwen2.5-vl")
    with pytest.raises(pruneware.PlanError, match="exact, max, mae, rmse"):
        pruneware.prune(model, "pixelprune[method=l2]@pre-vit:1.0").__enter__()
    with pytest.raises(pruneware.PlanError, match="pixelprune"):
        pruneware.prune(model, "pixelprune@pre:0.5").__enter__()
