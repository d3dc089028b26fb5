"""`pixelprune`: drop the 2x2 units whose pixels their neighbours already predict (PixelPrune).

PixelPrune (arXiv 2604.00886; official code OPPO-Mente-Lab/PixelPrune, `methods/pred_2d.py`,
its default `pred_2d` selector) runs before the vision tower on each image's merged units (the
unit's patches' pixel values, concatenated). On the unit grid it predicts each unit X from its
causal neighbours A (left), B (above) and C (above-left), as JPEG-LS's LOCO-I predictor does:
the first row predicts from A, the first column from B; elsewhere the prediction is B when C
matches A but not B (a vertical edge), else A. X is kept (an *anchor*) when it does not match its
prediction; the top-left unit is always kept. Two units match when their distance is <= the
threshold: `exact` (L-inf distance, threshold 0), `max` (L-inf), `mae` (mean |d|), `rmse`.
With `exact` (or `max` at 0) the rule compares each unit with the original neighbours (the
official vectorised path); otherwise with the *reconstructed* grid, where a dropped unit takes
its prediction's value (the official `anchored` loop), so errors cannot accumulate.

Here it runs at `pre-vit` on the units' raw patches (the processor's normalised values: the
threshold is in those units), per image and per video frame. Deliberate extension: PixelPrune
keeps every anchor, with no budget; here the stage's budget caps them: when an image has more
anchors than its share, the ones predicted worst (largest distance) are kept. `budget 1.0` is
PixelPrune itself. At `vitK` the same rule reads the units' block-K states (mean over the unit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pruneware.errors import PlanError
from pruneware.policies.base import Policy, StageInput, register_policy, split_budget
from pruneware.policies.needs import Needs

METHODS = ("exact", "max", "mae", "rmse")


def unit_distance(x: torch.Tensor, y: torch.Tensor, method: str) -> torch.Tensor:
    """[...] distance between units x, y [..., D] under `method`."""
    diff = (x - y).abs()
    if method in ("exact", "max"):
        return diff.amax(dim=-1)
    if method == "mae":
        return diff.mean(dim=-1)
    return diff.pow(2).mean(dim=-1).sqrt()


def loco_anchors(grid: torch.Tensor, method: str = "exact", threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep [h, w] bool, distance [h, w] to the prediction) of one (h, w, D) unit grid."""
    h, w, _ = grid.shape
    limit = 0.0 if method == "exact" else threshold
    if method == "exact" or (method == "max" and threshold == 0):
        return _sliding(grid, method, limit)
    return _anchored(grid, method, limit)


def _sliding(g: torch.Tensor, method: str, limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    h, w, _ = g.shape
    dist = torch.full((h, w), float("inf"), device=g.device)  # the top-left unit has no prediction
    if w > 1:
        dist[0, 1:] = unit_distance(g[0, 1:], g[0, :-1], method)
    if h > 1:
        dist[1:, 0] = unit_distance(g[1:, 0], g[:-1, 0], method)
    if h > 1 and w > 1:
        x, a, b, c = g[1:, 1:], g[1:, :-1], g[:-1, 1:], g[:-1, :-1]
        use_b = (unit_distance(c, a, method) <= limit) & ~(unit_distance(c, b, method) <= limit)
        dist[1:, 1:] = unit_distance(x, torch.where(use_b[..., None], b, a), method)
    return dist > limit, dist


def _anchored(g: torch.Tensor, method: str, limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    h, w, _ = g.shape
    recon = g.clone()
    keep = torch.zeros(h, w, dtype=torch.bool, device=g.device)
    dist = torch.full((h, w), float("inf"), device=g.device)
    keep[0, 0] = True
    for r in range(h):
        for c in range(w):
            if r == 0 and c == 0:
                continue
            a = recon[r, c - 1] if c > 0 else recon[r - 1, 0]
            pred = a
            if r > 0 and c > 0:
                b, cc = recon[r - 1, c], recon[r - 1, c - 1]
                if unit_distance(cc, a, method) <= limit and not unit_distance(cc, b, method) <= limit:
                    pred = b
            dist[r, c] = unit_distance(g[r, c], pred, method)
            if dist[r, c] > limit:
                keep[r, c] = True
            else:
                recon[r, c] = pred
    return keep, dist


@register_policy
@dataclass(frozen=True)
class PixelPrunePolicy(Policy):
    name = "pixelprune"
    description = "PixelPrune: drop units their left/upper neighbours predict (LOCO-I), before the vision tower."
    needs: ClassVar[Needs] = Needs(where=("vit",))
    method: str = "exact"
    threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PlanError(f"pixelprune method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.threshold < 0:
            raise PlanError(f"pixelprune threshold must be >= 0, got {self.threshold}")

    def select(self, inputs: StageInput, counts: list[int]) -> list[torch.Tensor]:
        out = []
        for b, grids in enumerate(inputs.grids):
            parts = []
            sizes = [hh * ww for hh, ww in grids]
            for image, ((hh, ww), budget) in enumerate(zip(grids, split_budget(sizes, counts[b]), strict=True)):
                members = (inputs.image_ids[b] == image).nonzero().squeeze(1)
                if members.numel() != hh * ww:
                    raise PlanError(
                        f"pixelprune predicts each unit from its neighbours on the whole {hh}x{ww} grid, but an "
                        f"earlier vision-side stage left {members.numel()} of its units: make pixelprune the plan's "
                        "first vision-side stage (e.g. pixelprune@pre-vit:0.8,divprune@vit1:0.5)"
                    )
                keep, dist = loco_anchors(inputs.hidden[b, members].float().view(hh, ww, -1), self.method, self.threshold)
                keep, dist = keep.flatten(), dist.flatten()
                if int(keep.sum()) > budget:  # over the share: the anchors predicted worst
                    keep = torch.zeros_like(keep).scatter_(0, dist.topk(budget).indices, True)
                parts.append(members[keep.nonzero().squeeze(1)])
            out.append(torch.cat(parts).sort().values if parts else torch.zeros(0, dtype=torch.long))
        return out
