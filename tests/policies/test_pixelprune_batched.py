"""`pixelprune` on many frames at once (`loco_distances`, the policy's batched `select`) keeps what
the official rule, one frame at a time, keeps: the anchors, capped by each frame's budget."""

from __future__ import annotations

import pytest
import torch

from pruneware.policies import StageInput
from pruneware.policies.base import split_budget
from pruneware.policies.pixelprune import PixelPrunePolicy, loco_anchors, loco_distances
from tests.policies.test_pixelprune import _document, official_rule


def _frames(n: int, h: int, w: int) -> torch.Tensor:
    return torch.stack([_document(h, w, seed) for seed in range(n)])  # [n, h, w, 8]


@pytest.mark.parametrize(("h", "w"), [(7, 9), (1, 5), (6, 1), (1, 1), (2, 2)])
@pytest.mark.parametrize("method", ["exact", "max"])
def test_batched_distances_give_the_official_anchors(h, w, method):
    grids = _frames(3, h, w)
    dist = loco_distances(grids, method, 0.0)
    assert dist.shape == (3, h, w) and dist[:, 0, 0].isinf().all()
    for i in range(3):
        assert torch.equal(dist[i] > 0, official_rule(grids[i], method, 0.0, anchored=False))


def test_reconstructed_grid_methods_are_not_batched():
    assert loco_distances(_frames(2, 3, 3), "mae", 0.01) is None
    assert loco_distances(_frames(2, 3, 3), "max", 0.02) is None


def _one_frame_rule(grid: torch.Tensor, budget: int, method: str, threshold: float) -> torch.Tensor:
    """The policy's rule for one frame, written plainly: its anchors, or the `budget` farthest from their prediction."""
    anchors = official_rule(grid, method, threshold, anchored=not (method == "exact" or threshold == 0)).flatten()
    if int(anchors.sum()) <= budget:
        return anchors.nonzero().squeeze(1)
    dist = loco_anchors(grid, method, threshold)[1].flatten()
    return dist.topk(budget).indices.sort().values


@pytest.mark.parametrize("budget", [3, 20, 63])  # capped everywhere, capped in some frames, never capped
@pytest.mark.parametrize("frames", [1, 2])
@pytest.mark.parametrize(("method", "threshold"), [("exact", 0.0), ("mae", 0.005)])
def test_select_equals_the_rule_frame_by_frame(budget, frames, method, threshold):
    rows, h, w = 3, 7, 9
    grids = _frames(rows * frames, h, w)
    hidden = grids.view(rows, frames * h * w, -1)
    n = frames * h * w
    inputs = StageInput(
        hidden=hidden, valid=torch.ones(rows, n, dtype=torch.bool),
        image_ids=torch.arange(frames).repeat_interleave(h * w).expand(rows, n), attention=None, seed=0, layer=0,
        grids=[[(h, w)] * frames] * rows, sizes=[[h * w] * frames] * rows,
    )
    counts = [budget * frames] * rows
    picked = PixelPrunePolicy(method=method, threshold=threshold).select(inputs, counts)
    for b in range(rows):
        share = split_budget([h * w] * frames, counts[b])
        expected = torch.cat([f * h * w + _one_frame_rule(grids[b * frames + f], share[f], method, threshold)
                              for f in range(frames)])
        assert torch.equal(picked[b], expected)
