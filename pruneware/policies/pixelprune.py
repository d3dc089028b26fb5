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
from pruneware.kernels.loco import loco_distances as kernel_distances
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
    limit = 0.0 if method == "exact" else threshold
    dist = loco_distances(grid[None], method, threshold)
    if dist is not None:
        return dist[0] > limit, dist[0]
    return _anchored(grid, method, limit)


def loco_distances(grids: torch.Tensor, method: str = "exact", threshold: float = 0.0) -> torch.Tensor | None:
    """[n, h, w] each unit's distance to its LOCO-I prediction from its original neighbours (inf at
    the top-left unit), for n (h, w, D) unit grids at once ([n, h, w, D]); None for the methods that
    compare with the reconstructed grid (see the module docstring: a unit-by-unit loop).

    One kernel call (`pruneware.kernels.loco`: a Triton launch on CUDA, numpy on the CPU, the
    plain-torch rule beside them)."""
    if not (method == "exact" or (method == "max" and threshold == 0)):
        return None
    return kernel_distances(grids)


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

    def select(self, inputs: StageInput, counts: list[int]) -> list[torch.Tensor] | torch.Tensor:
        alive = inputs.image_sizes()  # on the host when the engine knows them
        frames = []  # (row, frame, (h, w), budget, first unit): a row's frames may differ in size (LLaVA-NeXT)
        for b, grids in enumerate(inputs.grids):
            budgets = split_budget([hh * ww for hh, ww in grids], counts[b])
            firsts = [sum(hh * ww for hh, ww in grids[:i]) for i in range(len(grids))]
            for image, ((hh, ww), budget, first) in enumerate(zip(grids, budgets, firsts, strict=True)):
                if alive[b][image] != hh * ww:
                    raise PlanError(
                        f"pixelprune predicts each unit from its neighbours on the whole {hh}x{ww} grid, but an "
                        f"earlier vision-side stage left {alive[b][image]} of its units: make pixelprune the plan's "
                        "first vision-side stage (e.g. pixelprune@pre-vit:0.8,divprune@vit1:0.5)"
                    )
                frames.append((b, image, (hh, ww), budget, first))
        if not frames:
            return [torch.zeros(0, dtype=torch.long) for _ in inputs.grids]
        x = inputs.hidden if inputs.hidden.dtype == torch.float32 else inputs.hidden.float()
        (hh, ww), t = frames[0][2], len(inputs.grids[0])
        dist = None
        if all(f[2] == (hh, ww) for f in frames) and all(len(g) == t for g in inputs.grids) \
                and x.shape[1] == t * hh * ww:  # every frame alike: one batched pass
            dist = loco_distances(x.reshape(-1, hh, ww, x.shape[-1]), self.method, self.threshold)
        if dist is None:  # the reconstructed-grid methods (a loop), or frames of several sizes
            return self._keep([loco_anchors(x[b, first:first + h * w].view(h, w, -1), self.method,
                                            self.threshold)[1].flatten() for b, _, (h, w), _, first in frames],
                              frames, inputs)
        return self._keep(dist.view(len(frames), hh * ww), frames, inputs)

    def _keep(self, dist: torch.Tensor | list[torch.Tensor], frames: list, inputs: StageInput
              ) -> list[torch.Tensor] | torch.Tensor:
        """Per row, the sorted kept units: each frame's anchors (distance over the limit), or, when
        it has more than its budget, the budget predicted worst. dist: [n_frames, h * w] (or one
        [h_i * w_i] per frame). The anchor counts set the sizes: one host read, the stage's only one."""
        limit = 0.0 if self.method == "exact" else self.threshold
        stacked = isinstance(dist, torch.Tensor)
        anchors = dist > limit if stacked else [d > limit for d in dist]
        n_anchors = (anchors.sum(dim=1) if stacked else torch.stack([a.sum() for a in anchors])).tolist()
        budgets = [f[3] for f in frames]
        t = len(inputs.grids[0])
        if stacked and len(set(budgets)) == 1 and all(n > budgets[0] for n in n_anchors) \
                and all(len(g) == t for g in inputs.grids):  # every frame capped at one budget
            rows = dist.topk(budgets[0], dim=1).indices.sort(dim=1).values  # [n_frames, k]
            if t == 1:
                return rows
            offsets = torch.arange(t, device=rows.device).repeat_interleave(budgets[0]) * dist.shape[1]
            return rows.view(len(inputs.grids), t * budgets[0]) + offsets
        parts: list[list[torch.Tensor]] = [[] for _ in inputs.grids]
        for i, (b, _, _, budget, first) in enumerate(frames):
            keep = anchors[i]
            if n_anchors[i] > budget:  # over the share: the anchors predicted worst
                keep = torch.zeros_like(keep).scatter_(0, dist[i].topk(budget).indices, True)
            parts[b].append(first + keep.nonzero().squeeze(1))
        return [torch.cat(p).sort().values if p else torch.zeros(0, dtype=torch.long) for p in parts]
