"""Bookkeeping for a pruned sequence: which original tokens survive, and how to slice.

A *level* is the sequence seen by a range of decoder layers: level 0 is what enters the
language model (after a `pre` stage, if any); each in-LLM stage makes the next level. Rows
are samples; a sample that keeps fewer tokens than another is left-padded with invalid slots
so the batch stays rectangular.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import torch

from pruneware.engine.run_tables import run_cut, run_order, run_starts
from pruneware.plans.plan import Stage


@dataclass(eq=False)
class Level:
    """The kept sequence of one level, for a batch of B samples and Ls slots.

    Attributes:
        index_prev: [B, Ls] long: slot -> position in the previous level's sequence.
        index0: [B, Ls] long: slot -> position in the level-0 sequence (masks and positions
            that the model loop passes to every layer are level-0 sized).
        orig: [B, Ls] long: slot -> position in the original input.
        valid: [B, Ls] bool: False for padding slots added by pruning.
        image_ids: [B, Ls] long: image index of each visual slot, -1 for text and invalid slots.
        identity: True when the slots are exactly the level-0 sequence (mask and position
            slicing is skipped).
        same_as_prev: True when nothing was dropped from the previous level (the hidden-state
            gather is skipped).
        cache: per-forward memo of sliced masks and positions, keyed by kind.
        n_slots, n_visual: per sample, its valid slots and its visual slots, kept on the host
            so that no stage needs a device sync to read them.
        stage: the stage that made this level (None for level 0).
        image_sizes: per sample, the visual slots of each image (as `StageInput.image_sizes`
            counts them), on the host; None when not known (after a stage drops tokens).
        visual_span: (start, n) when the visual slots of every sample are exactly slots
            start..start+n-1 (n > 0; one image run per prompt, no padding slots), known on the
            host: a stage then reads them by slicing, with no sort and no gather.
        is_root: the slots are the original input itself (index_prev, index0 and orig are
            0..L-1), so gathering index0 or orig by an index gives the index.
        one_unit: every sample has at most one image (its visual slots all hold image id 0),
            known on the host: the visual-first order is then one sort of `image_ids`.
        visual_starts: per sample b, the first of its visual slots when they are one run
            start_b..start_b+n_visual[b]-1 (no padding slots), known on the host: a left-padded
            batch's samples each have one run, at different slots. Then the visual-first order,
            the slots a stage reads and the next level's index are made from host-built tables
            (`run_tables.py`): no sort.
    """

    index_prev: torch.Tensor
    index0: torch.Tensor
    orig: torch.Tensor
    valid: torch.Tensor
    image_ids: torch.Tensor
    identity: bool = False
    same_as_prev: bool = False
    cache: dict[str, object] = field(default_factory=dict)
    n_slots: list[int] = field(default_factory=list)
    n_visual: list[int] = field(default_factory=list)
    stage: Stage | None = None
    image_sizes: list[list[int]] | None = None
    visual_span: tuple[int, int] | None = None
    is_root: bool = False
    visual_perm: torch.Tensor | None = field(default=None, repr=False)  # see `_uniform_level`
    one_unit: bool = False
    visual_starts: tuple[int, ...] | None = None

    @property
    def length(self) -> int:
        return self.index_prev.shape[1]

    @property
    def all_valid(self) -> bool:
        """No padding slots (read from the host-side counts, no device sync)."""
        return all(n == self.length for n in self.n_slots)

    @cached_property
    def visual_first(self) -> torch.Tensor:
        """[B, Ls] long: slot indices with the visual slots first, in slot order (computed once)."""
        if self.visual_starts is not None:  # host-built: no op
            return run_order(self.visual_starts, tuple(self.n_visual), self.length, self.index_prev.device)
        if self.visual_perm is not None:
            return self.visual_perm.argsort(dim=1)
        if self.one_unit:  # ids are 0 (visual) or -1: a descending stable sort puts the 0s first, in slot order
            return torch.sort(self.image_ids, dim=1, descending=True, stable=True).indices
        return torch.sort((~self.visual).to(torch.int8), dim=1, stable=True).indices

    @cached_property
    def visual(self) -> torch.Tensor:
        """[B, Ls] bool: the visual slots (computed once per level)."""
        return self.image_ids >= 0

    def kept_visual(self) -> list[torch.Tensor]:
        """Per sample, the original input positions of the visual tokens at this level."""
        return [row[ok] for row, ok in zip(self.orig, self.visual, strict=True)]

    def visual_counts(self) -> list[int]:
        return list(self.n_visual)


@lru_cache(maxsize=32)
def _identity(batch: int, length: int, device: torch.device, inference: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, L] 0..L-1 expanded, [B, L] all True), made once per shape and device and shared by
    every forward (no level writes into its index tensors). `inference`: made in inference mode
    or not, so that a tensor made under `torch.inference_mode` never reaches autograd."""
    arange = torch.arange(length, device=device).expand(batch, length)
    return arange, torch.ones(batch, length, dtype=torch.bool, device=device)


def identity_tensors(batch: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, L] 0..L-1, [B, L] all True) for the current device and inference mode (cached)."""
    return _identity(batch, length, device, torch.is_inference_mode_enabled())


def root_level(
    image_ids: torch.Tensor, n_visual: list[int], image_sizes: list[list[int]] | None = None,
    visual_span: tuple[int, int] | None = None, spans: list[tuple[int, int] | None] | None = None,
) -> Level:
    """The unpruned sequence: image_ids [B, L] as given by the adapter, n_visual its visual tokens
    per sample; host-side when known, image_sizes the tokens of each of its images,
    visual_span the one run of visual positions every sample shares (see `VisualLayout.visual_span`)
    and spans each sample's own run (`VisualLayout.spans`)."""
    b, length = image_ids.shape
    arange, ones = identity_tensors(b, length, image_ids.device)
    one_unit = image_sizes is not None and all(len(sizes) <= 1 for sizes in image_sizes)
    starts = None
    if spans and all(span is not None and span[1] == n > 0 for span, n in zip(spans, n_visual, strict=True)):
        starts = tuple(span[0] for span in spans)  # type: ignore[index]
    return Level(arange, arange, arange, ones, image_ids, identity=True, same_as_prev=True,
                 n_slots=[length] * b, n_visual=list(n_visual), image_sizes=image_sizes, visual_span=visual_span,
                 is_root=True, one_unit=one_unit, visual_starts=starts)


def next_level(
    parent: Level, keep_visual: list[torch.Tensor] | torch.Tensor, visual_slots: torch.Tensor | None = None,
) -> Level:
    """The level that keeps every valid non-visual slot of `parent` plus the chosen visual ones.

    keep_visual[b] holds sorted, distinct indices into sample b's visual slots (in slot order):
    a list, or a [B, k] tensor when every sample keeps k. visual_slots: [B, k] the parent's slots
    of those tokens, when the caller has them already (the stage's report reads them): not made
    twice. Built with batched tensor ops; the new length comes from the host-side counts, so no sync.
    """
    batch, length = parent.index_prev.shape
    device = parent.index_prev.device
    stacked = isinstance(keep_visual, torch.Tensor)
    if stacked:
        kept = [keep_visual.shape[1]] * batch
    else:
        kept = [k.numel() for k in keep_visual] if keep_visual else [0] * batch
    n_slots = [n - v + k for n, v, k in zip(parent.n_slots, parent.n_visual, kept, strict=True)]
    new_length = max(n_slots, default=0)
    if n_slots == [length] * batch:  # nothing dropped
        return Level(
            identity_tensors(batch, length, device)[0],
            parent.index0, parent.orig, parent.valid, parent.image_ids,
            identity=parent.identity, same_as_prev=True, n_slots=n_slots, n_visual=kept,
            image_sizes=parent.image_sizes, visual_span=parent.visual_span, is_root=parent.is_root,
            one_unit=parent.one_unit, visual_starts=parent.visual_starts,
        )
    chosen = None
    if max(kept, default=0) and min(kept) == max(kept):  # as many per sample (batch 1): no padding
        if stacked:
            chosen = keep_visual
        else:
            chosen = keep_visual[0][None] if batch == 1 else torch.stack(list(keep_visual))
        chosen = chosen if chosen.device == device else chosen.to(device)
        if parent.all_valid and min(parent.n_visual) == max(parent.n_visual):
            return _uniform_level(parent, chosen, n_slots, visual_slots)
    # Visual slots of each row, in slot order, first: order[b, j] is the j-th visual slot.
    order = parent.visual_first
    keep = parent.valid & ~parent.visual
    if chosen is not None:
        keep = keep.scatter(1, order.gather(1, chosen), True)
    elif max(kept, default=0):
        chosen = torch.nn.utils.rnn.pad_sequence(
            [k if k.device == device else k.to(device) for k in keep_visual], batch_first=True, padding_value=-1
        )
        slots = order.gather(1, chosen.clamp(min=0))
        # scatter_add, not scatter: padding entries (-1) alias a real slot and must not unset it.
        hits = torch.zeros(batch, length, dtype=torch.int32, device=device).scatter_add_(1, slots, (chosen >= 0).int())
        keep = keep | (hits > 0)
    # Kept slots last, in slot order: the rows come out left-padded with dropped slots.
    index = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, length - new_length:]
    # A slot is valid iff it holds a kept slot (kept slots were valid in the parent).
    valid = keep.gather(1, index)
    image_ids = torch.where(valid, parent.image_ids.gather(1, index), -1)
    index0 = parent.index0.gather(1, index)
    return Level(
        index, index0, _child_orig(parent, index, index0), valid, image_ids,
        n_slots=n_slots, n_visual=kept, image_sizes=_one_unit_sizes(parent, kept), one_unit=parent.one_unit,
    )


def _uniform_level(parent: Level, chosen: torch.Tensor, n_slots: list[int], visual_slots: torch.Tensor | None) -> Level:
    """`next_level` when no row is padded before or after: every sample has the parent's length,
    the same visual count, and keeps as many (chosen: [B, k] into the visual slots).

    Then the new index is the sorted union of the parent's non-visual slots and the chosen
    visual ones: one small sort instead of a mask, a scatter and a full-length sort, and the
    sort's permutation gives the new level's visual-first order for free (inverted only if a
    later stage asks for it). When the visual slots are one known run (`visual_span`), the
    union is already in order: the text slots before the run, the chosen ones, the text after;
    those text runs, and the image ids when every sample has one image, depend on the shapes
    only and are made once (`_span_parts`); when each sample has its own run (`visual_starts`),
    the cut is one scatter of the kept slots into a host-built table (`run_tables.run_cut`).
    visual_slots: see `next_level`.
    """
    batch, k = chosen.shape
    span = image_ids = starts = None
    if parent.visual_span is not None:
        start, n = parent.visual_span
        before, after, one_image = _span_parts(batch, parent.length, start, n, k, chosen.device,
                                               torch.is_inference_mode_enabled())
        index = torch.cat([before, chosen + start if visual_slots is None else visual_slots, after], dim=1)
        perm, span, starts = None, (start, k), parent.visual_starts
        image_ids = one_image if parent.one_unit and parent.image_ids.dtype == torch.long else None
    elif parent.visual_starts is not None:  # one run per sample, at its own slot: the same cut, from host tables
        starts = parent.visual_starts
        cut = run_cut(starts, parent.length, parent.n_visual[0], k, chosen.device)
        if visual_slots is None:
            visual_slots = chosen + run_starts(starts, chosen.device)
        index = cut.text.scatter(1, cut.columns, visual_slots)  # [B, Ls]: text slots, the run's overwritten
        perm = None
        image_ids = cut.image_ids if parent.one_unit and parent.image_ids.dtype == torch.long else None
    else:
        order = parent.visual_first  # [B, L]: the n visual slots, then the text slots
        if visual_slots is None:
            visual_slots = order.gather(1, chosen)  # [B, k] ascending, since `chosen` is
        index, perm = torch.cat([visual_slots, order[:, parent.n_visual[0]:]], dim=1).sort(dim=1)  # distinct: no ties
    # perm[b, j] is the concatenation entry that new slot j holds; its inverse lists the new
    # slots of the kept visual entries (ascending), then of the text entries (ascending).
    index0 = index if parent.is_root else parent.index0.gather(1, index)
    return Level(
        index, index0, index if parent.is_root else _child_orig(parent, index, index0),
        identity_tensors(batch, index.shape[1], index.device)[1],
        parent.image_ids.gather(1, index) if image_ids is None else image_ids,
        n_slots=n_slots, n_visual=[k] * batch, image_sizes=_one_unit_sizes(parent, [k] * batch), visual_span=span,
        visual_perm=perm, one_unit=parent.one_unit, visual_starts=starts,
    )


@lru_cache(maxsize=64)
def _span_parts(
    batch: int, length: int, start: int, n: int, k: int, device: torch.device, inference: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a level cut from a parent of `length` slots whose visual run is slots start..start+n-1,
    keeping k of them: ([B, start] the slots before the run, [B, length - start - n] those after
    it, [B, length - n + k] long image ids: 0 on the kept run, -1 elsewhere, for one image per
    sample). Made once per shape, device and inference mode, shared by every forward (never written)."""
    slots = torch.arange(length, device=device).expand(batch, length)
    ids = torch.full((length - n + k,), -1, dtype=torch.long, device=device)
    ids[start:start + k] = 0
    return slots[:, :start], slots[:, start + n:], ids.expand(batch, -1)


def _child_orig(parent: Level, index: torch.Tensor, index0: torch.Tensor) -> torch.Tensor:
    """A child level's `orig`: its `index0` itself when the parent's two are one tensor (no `pre`
    stage: level 0 is the input, so level-0 and input positions agree), else a gather."""
    return index0 if parent.orig is parent.index0 else parent.orig.gather(1, index)


def _one_unit_sizes(parent: Level, kept: list[int]) -> list[list[int]] | None:
    """A child level's `image_sizes` when its parent's samples have one image at most (then
    known on the host from the kept counts, as `torch.bincount` counts them), else None."""
    return [[k] if k else [] for k in kept] if parent.one_unit else None


def write_visual(level: Level, hidden: torch.Tensor, embeds: list[torch.Tensor]) -> torch.Tensor:
    """hidden [B, Ls, D] with each sample's visual slots (in slot order) set to embeds[b] [k_b, D]."""
    slots = level.visual_first
    rows = torch.cat([torch.full((e.shape[0],), b, device=hidden.device) for b, e in enumerate(embeds)])
    cols = torch.cat([slots[b, : e.shape[0]] for b, e in enumerate(embeds)])
    values = torch.cat(list(embeds)).to(hidden.dtype)
    return hidden.index_put((rows, cols), values)


def as_root(level: Level) -> Level:
    """Make a `pre`-stage level the new level 0: later masks and positions are its size."""
    b, length = level.index_prev.shape
    arange = identity_tensors(b, length, level.index_prev.device)[0]
    return Level(level.index_prev, arange, level.orig, level.valid, level.image_ids, True, level.same_as_prev,
                 n_slots=level.n_slots, n_visual=level.n_visual, image_sizes=level.image_sizes,
                 visual_span=level.visual_span, one_unit=level.one_unit, visual_starts=level.visual_starts)
