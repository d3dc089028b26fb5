"""The policy's batch for one vision-tower call, and the kept units as the language model sees them.

Helpers of `pruneware.engine.vit_stages`, kept apart to stay small. Everything sized here is
sized from the host: the call's units (t, h, w) come from the pixels' shape or the grids the
layout already read, and each image's kept count from the plan, so nothing waits on the device.
Tensors that depend only on those sizes (valid rows, image ids, offsets) are built once per
shape and reused (`ShapeCache`), as `levels.identity_tensors` does for the language model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pruneware.engine.levels import Level
from pruneware.plans.plan import Stage
from pruneware.policies import StageInput
from pruneware.report import StageReport

Units = Sequence[tuple[int, int, int]]


class ShapeCache:
    """Constant tensors built once per (name, shape, device, inference mode) and reused across calls.

    Callers never write into what `get` returns."""

    def __init__(self) -> None:
        self._store: dict[tuple, torch.Tensor] = {}

    def get(self, key: tuple, device: torch.device, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        full = (*key, str(device), torch.is_inference_mode_enabled())
        tensor = self._store.get(full)
        if tensor is None:
            if len(self._store) > 64:  # a bounded memo: many distinct shapes just rebuild
                self._store.clear()
            tensor = self._store[full] = build()
        return tensor


def unit_input(
    stage: Stage, feats: torch.Tensor, scores: torch.Tensor | None, units: Units, seed: int,
    alive: torch.Tensor | None = None, cache: ShapeCache | None = None,
    frames: list[list[tuple[int, int]]] | None = None,
) -> tuple[StageInput, list[int]]:
    """The policy's batch for one encoder call: row b is image b, its frames are its images.

    feats: [n_units, D] row-major over the call (or [n_images, n, D] when every image has n);
    scores: [n_units] (or [n_images, n]) or None; alive: [n_units] bool,
    the units an earlier vision-side stage kept (None: all); the others are invalid rows; units:
    per image (t, h, w). Returns the input and each row's budget (from its own unit count, capped
    by the units alive). When every image has as many units and all are alive, the batch is a view
    of `feats` and its masks come from `cache` (built once per shape): a handful of ops.
    frames: per image, the (h, w) grid of each of its frames when they differ in size (LLaVA-NeXT:
    base, then high-res; `units` then gives (1, 1, n)); None: t frames of (h, w).
    """
    sizes = [t * hh * ww for t, hh, ww in units]
    n, batch, device = max(sizes), len(sizes), feats.device
    grids = [[(hh, ww)] * t for t, hh, ww in units] if frames is None else [list(f) for f in frames]
    frame_sizes = [[hh * ww for hh, ww in g] for g in grids]
    if alive is None and len(set(units)) == 1 and frames is None:
        inputs = _uniform_input(feats, scores, units, seed, cache or ShapeCache())
        inputs.grids, inputs.sizes = grids, frame_sizes
        return inputs, [min(stage.keep_count(m, m), m) for m in sizes]
    feats = feats.reshape(-1, feats.shape[-1])
    scores = None if scores is None else scores.reshape(-1)
    hidden = feats.new_zeros(batch, n, feats.shape[-1])
    valid = torch.zeros(batch, n, dtype=torch.bool, device=device)
    image_ids = torch.full((batch, n), -1, dtype=torch.long, device=device)
    vision_scores = None if scores is None else torch.zeros(batch, n, dtype=torch.float32, device=device)
    start = 0
    for b, (t, hh, ww) in enumerate(units):
        m = t * hh * ww
        hidden[b, :m] = feats[start : start + m]
        valid[b, :m] = True if alive is None else alive[start : start + m]
        image_ids[b, :m] = _frame_ids(frame_sizes[b], device)
        if vision_scores is not None:
            vision_scores[b, :m] = scores[start : start + m].float()
        start += m
    if alive is not None:  # one host read: the units alive per frame
        image_ids.masked_fill_(~valid, -1)
        frame_of = torch.cat([_frame_ids(f, device) + sum(len(g) for g in frame_sizes[:b])
                              for b, f in enumerate(frame_sizes)])
        alive_per_frame = torch.zeros(sum(len(f) for f in frame_sizes), dtype=torch.long, device=device)
        flat = alive_per_frame.index_add_(0, frame_of, alive.long()).tolist()
        frame_sizes = [[flat.pop(0) for _ in f] for f in frame_sizes]
    inputs = StageInput(
        hidden=hidden, valid=valid, image_ids=image_ids, attention=None, seed=seed, layer=0,
        grids=grids, vision_scores=vision_scores, sizes=frame_sizes,
    )
    return inputs, [min(stage.keep_count(m, sum(f)), sum(f)) for m, f in zip(sizes, frame_sizes, strict=True)]


def _frame_ids(sizes: list[int], device: torch.device) -> torch.Tensor:
    """[sum(sizes)] the frame of each unit of an image whose frames hold `sizes` units each."""
    if len(set(sizes)) <= 1:
        return torch.arange(len(sizes), device=device).repeat_interleave(sizes[0] if sizes else 0)
    return torch.arange(len(sizes), device=device).repeat_interleave(torch.tensor(sizes, device=device))


def _uniform_input(feats: torch.Tensor, scores: torch.Tensor | None, units: Units, seed: int,
                   cache: ShapeCache) -> StageInput:
    """`unit_input` when every image has the same (t, h, w) and every unit is alive: views and cached masks."""
    (t, hh, ww), batch, device = units[0], len(units), feats.device
    n = t * hh * ww
    valid = cache.get(("valid", batch, n), device, lambda: torch.ones(batch, n, dtype=torch.bool, device=device))
    image_ids = cache.get(("frames", batch, t, hh * ww), device, lambda: torch.arange(
        t, device=device).repeat_interleave(hh * ww).expand(batch, n).contiguous())
    vision_scores = None
    if scores is not None:
        vision_scores = scores.view(batch, n)
        vision_scores = vision_scores if vision_scores.dtype == torch.float32 else vision_scores.float()
    hidden = feats if feats.dim() == 3 else feats.view(batch, n, feats.shape[-1])
    return StageInput(hidden=hidden, valid=valid, image_ids=image_ids, attention=None,
                      seed=seed, layer=0, vision_scores=vision_scores)


def picked_rows(picked: list[torch.Tensor] | torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """A policy's choice as one [n_images, k] tensor of unit indices per image (sorted), or None
    when the images keep different counts (or none)."""
    if isinstance(picked, torch.Tensor):
        rows = picked
    else:
        if not picked or len({p.numel() for p in picked}) != 1 or picked[0].numel() == 0:
            return None
        rows = picked[0][None] if len(picked) == 1 else torch.stack(list(picked))
    return rows if rows.device == device else rows.to(device)


def keep_mask(picked: list[torch.Tensor] | torch.Tensor, units: Units, device: torch.device) -> torch.Tensor:
    """[n_units] bool, row-major over the call: the units `picked` (per image, unit indices) keeps."""
    keep = torch.zeros(sum(t * hh * ww for t, hh, ww in units), dtype=torch.bool, device=device)
    start = 0
    for (t, hh, ww), rows in zip(units, picked, strict=True):
        keep[start + rows.to(device)] = True
        start += t * hh * ww
    return keep


def uniform_language_keep(
    picked: list[torch.Tensor], units: list[tuple[int, int, int]], n_visual: list[int], cache: ShapeCache,
) -> torch.Tensor | None:
    """[B, m * k] per sample, the indices (into its visual slots) of the units one stage kept, when
    every sample holds m images of the same size, each keeping k (None otherwise: the caller reads
    the masks instead). picked: per encoder call (in reading order), [n_images, k] unit indices per
    image; units: the (t, h, w) of every image of those calls, in order; n_visual: visual slots per sample."""
    batch = len(n_visual)
    if not units or len(set(units)) != 1 or batch == 0 or len(units) % batch or len({p.shape[1] for p in picked}) != 1:
        return None
    t, hh, ww = units[0]
    m, size = len(units) // batch, t * hh * ww
    if any(n != m * size for n in n_visual):
        return None
    rows = picked[0] if len(picked) == 1 else torch.cat(picked)
    k = rows.shape[1]
    if m == 1:
        return rows
    offsets = cache.get(("offsets", m, k, size), rows.device, lambda: (
        torch.arange(m, device=rows.device) * size).repeat_interleave(k))
    return rows.reshape(batch, m * k) + offsets


def vision_reports(
    stages: Sequence[Stage], kept_by_stage: Sequence[list[torch.Tensor] | torch.Tensor], root: Level,
    n_visual: list[int],
) -> list[StageReport]:
    """One report per vision-side stage: per sample, the input positions of the visual slots it kept.

    kept_by_stage: per stage, what `VisionStages.language_model_keep` returns (per sample, indices
    into its visual slots: a list, or a [B, k] tensor); root: the unpruned level; n_visual: visual
    slots per sample (host). A [B, k] choice is read in one op, as `stage_runner.run_stage` reads a `pre` stage's.
    """
    reports, n_before, originals = [], list(n_visual), None
    for stage, kept in zip(stages, kept_by_stage, strict=True):
        if isinstance(kept, torch.Tensor):
            kept = kept if kept.device == root.orig.device else kept.to(root.orig.device)
            if root.visual_span is not None:  # visual slot j is input position start + j
                positions = list(kept + root.visual_span[0])
            else:
                positions = list(root.visual_first.gather(1, kept))
            counts = [kept.shape[1]] * kept.shape[0]
        else:
            if originals is None:
                originals = [row[ok] for row, ok in zip(root.orig, root.visual, strict=True)]
            positions = [o[k] for o, k in zip(originals, kept, strict=True)]
            counts = [k.numel() for k in kept]
        reports.append(StageReport(stage.where, stage.policy, positions, n_before, counts))
        n_before = counts
    return reports
