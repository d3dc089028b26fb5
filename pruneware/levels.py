"""Bookkeeping for a pruned sequence: which original tokens survive, and how to slice.

A *level* is the sequence seen by a range of decoder layers: level 0 is what enters the
language model (after a `pre` stage, if any); each in-LLM stage makes the next level. Rows
are samples; a sample that keeps fewer tokens than another is left-padded with invalid slots
so the batch stays rectangular.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
    """

    index_prev: torch.Tensor
    index0: torch.Tensor
    orig: torch.Tensor
    valid: torch.Tensor
    image_ids: torch.Tensor
    identity: bool = False
    same_as_prev: bool = False
    cache: dict[str, object] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.index_prev.shape[1]

    @property
    def visual(self) -> torch.Tensor:
        return self.image_ids >= 0

    def kept_visual(self) -> list[torch.Tensor]:
        """Per sample, the original input positions of the visual tokens at this level."""
        return [row[ok] for row, ok in zip(self.orig, self.visual, strict=True)]

    def visual_counts(self) -> list[int]:
        return self.visual.sum(dim=1).tolist()


def root_level(image_ids: torch.Tensor) -> Level:
    """The unpruned sequence: image_ids [B, L] as given by the adapter."""
    b, length = image_ids.shape
    arange = torch.arange(length, device=image_ids.device).expand(b, length)
    ones = torch.ones_like(image_ids, dtype=torch.bool)
    return Level(arange, arange, arange, ones, image_ids, identity=True, same_as_prev=True)


def next_level(parent: Level, keep_visual: list[torch.Tensor]) -> Level:
    """The level that keeps every valid non-visual slot of `parent` plus the chosen visual ones.

    keep_visual[b] holds sorted indices into sample b's visual slots (in slot order). Built with
    batched tensor ops and a single host sync (the new length).
    """
    batch, length = parent.index_prev.shape
    device = parent.index_prev.device
    # Visual slots of each row, in slot order, first: order[b, j] is the j-th visual slot.
    order = torch.sort((~parent.visual).to(torch.int8), dim=1, stable=True).indices
    chosen = torch.nn.utils.rnn.pad_sequence(
        [k.to(device) for k in keep_visual], batch_first=True, padding_value=-1
    ) if keep_visual else torch.zeros(batch, 0, dtype=torch.long, device=device)
    keep = parent.valid & ~parent.visual
    if chosen.numel():
        slots = order.gather(1, chosen.clamp(min=0))
        # scatter_add, not scatter: padding entries (-1) alias a real slot and must not unset it.
        hits = torch.zeros(batch, length, dtype=torch.int32, device=device).scatter_add_(1, slots, (chosen >= 0).int())
        keep = keep | (hits > 0)
    counts = keep.sum(dim=1)
    new_length = int(counts.max()) if batch else 0
    if new_length == length and bool((counts == length).all()):  # nothing dropped
        return Level(
            torch.arange(length, device=device).expand(batch, length),
            parent.index0, parent.orig, parent.valid, parent.image_ids,
            identity=parent.identity, same_as_prev=True,
        )
    # Kept slots last, in slot order: the rows come out left-padded with dropped slots.
    index = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, length - new_length:]
    valid = torch.arange(new_length, device=device)[None] >= (new_length - counts)[:, None]
    image_ids = parent.image_ids.gather(1, index).masked_fill(~valid, -1)
    return Level(
        index, parent.index0.gather(1, index), parent.orig.gather(1, index),
        valid & parent.valid.gather(1, index), image_ids,
    )


def as_root(level: Level) -> Level:
    """Make a `pre`-stage level the new level 0: later masks and positions are its size."""
    b, length = level.index_prev.shape
    arange = torch.arange(length, device=level.index_prev.device).expand(b, length)
    return Level(level.index_prev, arange, level.orig, level.valid, level.image_ids, True, level.same_as_prev)
