"""Where the visual tokens of a batch are: `VisualLayout`, and `items_to_layout`, which lays
media items (`VisualItem`) over the token ids on the host."""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VisualLayout:
    """Where the visual tokens of a batch are.

    Attributes:
        image_ids: [B, L] long: for each input position, the index (within its sample) of the
            unit it belongs to (an image, a video frame, an anyres tile grid; see `VisualItem`),
            or -1 for text, padding and structural tokens kept like text.
        grids: per sample, the (height, width) token grid of each unit, in order.
        counts: per sample, its visual tokens (known on the host: no device sync to read).
        sizes: per sample, the tokens of each unit as `torch.bincount` counts the sample's unit
            ids (a trailing unit with no tokens is left out), on the host; None when not known.
        spans: per sample, (start, n) when its visual tokens are one run of positions (None
            otherwise); None when not known.
        first_real: per sample, the first column of the 2-D attention mask holding a real token
            (0 when unpadded), read in the layout's one host sync; None when not known.
        real: per sample, the real (non-zero) columns of that 2-D attention mask, from the same
            read (what the report counts); None when not known.
    """

    image_ids: torch.Tensor
    grids: list[list[tuple[int, int]]]
    counts: list[int]
    sizes: list[list[int]] | None = None
    spans: list[tuple[int, int] | None] | None = None
    first_real: list[int] | None = None
    real: list[int] | None = None

    @property
    def visual_span(self) -> tuple[int, int] | None:
        """(start, n) when every sample's visual tokens are exactly positions start..start+n-1
        (n > 0), the same in every sample (one image per prompt, an unpadded batch); else None."""
        if not self.spans or self.spans[0] is None or not self.spans[0][1]:
            return None
        return self.spans[0] if all(s == self.spans[0] for s in self.spans) else None

    @property
    def visual(self) -> torch.Tensor:
        """[B, L] bool: True at visual-token positions."""
        return self.image_ids >= 0


@dataclass(frozen=True)
class VisualItem:
    """One image or video as the language model sees it: a run of placeholder tokens split into units.

    A *unit* is what a layout calls an image: a picture, a video frame, an anyres tile. Each has
    its own grid and a share of the budget.

    Attributes:
        token_id: the placeholder token of its positions in `input_ids`.
        grids: (height, width) token grid of each unit, in order.
        sizes: tokens of each unit.
        units: [n] long, optional: the unit of each of the item's tokens, or -1 for a structural
            token that is kept like text (LLaVA-NeXT's newline rows). None: the units' tokens
            follow one another.
    """

    token_id: int
    grids: tuple[tuple[int, int], ...]
    sizes: tuple[int, ...]
    units: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return len(self.units) if self.units is not None else sum(self.sizes)

    def token_units(self) -> list[int]:
        """The unit of each of the item's tokens (-1 for structural tokens), on the host."""
        if self.units is not None:
            return self.units.tolist()
        return [unit for unit, size in enumerate(self.sizes) for _ in range(size)]


def items_to_layout(input_ids: torch.Tensor, items: list[VisualItem], rows: list[list[int]] | None = None) -> VisualLayout:
    """Lay out `items` over `input_ids` [B, L].

    For each placeholder token id, items are taken in batch order (as a model concatenates its
    `*_grid_thw` or `image_sizes`), each covering its next `length` positions of that id, which
    need not be contiguous (Qwen3-VL puts timestamps between video frames). Within a sample,
    units are numbered in order of appearance across all items, images and videos alike.
    The ids are read on the host once (one device sync for the whole layout), or not at all
    when the caller already holds them as `rows` (`input_ids.tolist()`).

    The image ids are built on the host from runs (one value over consecutive positions: a
    unit's tokens, the text between them) with C-level array operations, and become a tensor
    without a per-element conversion (`torch.tensor` of a nested list is slow).
    """
    if not input_ids.shape[0]:
        return VisualLayout(torch.full_like(input_ids, -1), [], [], [])
    runs, grids, counts, sizes = _layout_rows(input_ids.tolist() if rows is None else rows, items)
    spans = [_visual_span(row) for row in runs]
    flat = array("q")
    for row in runs:
        for value, length in row:
            flat += array("q", (value,)) * length
    if not flat:
        return VisualLayout(torch.full_like(input_ids, -1), grids, counts, sizes, spans)
    image_ids = torch.frombuffer(flat, dtype=torch.int64).view(input_ids.shape)  # shares `flat`, kept alive
    if image_ids.device != input_ids.device or image_ids.dtype != input_ids.dtype:  # else no op: it is already so
        image_ids = image_ids.to(input_ids.device, input_ids.dtype)
    return VisualLayout(image_ids, grids, counts, sizes, spans)


def _visual_span(runs: list[tuple[int, int]]) -> tuple[int, int] | None:
    """(start, n) when the visual runs of a row (value >= 0) follow one another, else None."""
    start = n = 0
    seen = ended = False
    for value, length in runs:
        if value >= 0:
            if ended:
                return None
            seen = True
            n += length
        elif seen:
            ended = True
        else:
            start += length
    return (start, n) if seen else (0, 0)


def _positions(row: list[int], token: int) -> range | list[int]:
    """The positions of `token` in `row`: a range when they are one run (the common case, found
    with list methods that run in C), else a list."""
    count = row.count(token)
    if not count:
        return range(0)
    start = row.index(token)
    if row[start : start + count] == [token] * count:
        return range(start, start + count)
    return [i for i, t in enumerate(row) if t == token]


def _layout_rows(
    rows: list[list[int]], items: list[VisualItem]
) -> tuple[list[list[tuple[int, int]]], list[list[tuple[int, int]]], list[int], list[list[int]]]:
    """`items_to_layout` on host rows: per sample, its image ids as runs of (value, length) that
    cover the row; grids per sample; visual tokens per sample; tokens per unit per sample."""
    repeat = _expansion(rows, items)
    if repeat > 1:  # generate() expanded the rows (beams, num_return_sequences) after encoding
        runs, grids, counts, sizes = _layout_rows(rows[::repeat], items)
        return (
            [r for r in runs for _ in range(repeat)],
            [g for g in grids for _ in range(repeat)],
            [n for n in counts for _ in range(repeat)],
            [s for s in sizes for _ in range(repeat)],
        )
    queues: dict[int, list[VisualItem]] = {}
    for item in items:
        queues.setdefault(item.token_id, []).append(item)
    per_sample: list[list[tuple[int, int]]] = []
    counts: list[int] = []
    all_runs: list[list[tuple[int, int]]] = []
    all_sizes: list[list[int]] = []
    for b, row in enumerate(rows):
        placed: list[tuple[int, VisualItem, range | list[int]]] = []
        for token, queue in queues.items():
            positions = _positions(row, token)
            taken = 0
            while taken < len(positions):
                if not queue:
                    raise ValueError(
                        f"sample {b} has {len(positions)} tokens of id {token}, more than the images or videos "
                        "given account for"
                    )
                item = queue.pop(0)
                if taken + item.length > len(positions):
                    raise ValueError(
                        f"sample {b}: {len(positions)} tokens of id {token} do not split into whole items "
                        f"(the next needs {item.length} from position {taken})"
                    )
                span = positions[taken : taken + item.length]
                placed.append((span[0], item, span))
                taken += item.length
        grids: list[tuple[int, int]] = []
        spans: list[tuple[int, int, int]] = []  # (start, length, unit id) over the row
        for _, item, span in sorted(placed, key=lambda p: p[0]):
            first = len(grids)
            if item.units is None and isinstance(span, range):  # each unit's tokens follow one another
                start = span.start
                for unit, size in enumerate(item.sizes):
                    spans.append((start, size, unit + first))
                    start += size
            else:
                for position, unit in zip(span, item.token_units(), strict=True):
                    spans.append((position, 1, unit + first if unit >= 0 else unit))
            grids.extend(item.grids)
        runs: list[tuple[int, int]] = []
        sizes: list[int] = []
        end = 0
        for start, length, unit in sorted(spans):
            if not length:
                continue
            if start > end:
                runs.append((-1, start - end))
            runs.append((unit, length))
            end = start + length
            if unit >= 0:
                if unit >= len(sizes):
                    sizes.extend([0] * (unit + 1 - len(sizes)))
                sizes[unit] += length
        if end < len(row):
            runs.append((-1, len(row) - end))
        all_runs.append(runs)
        all_sizes.append(sizes)
        per_sample.append(grids)
        counts.append(sum(sum(item.sizes) for _, item, _ in placed))
    left = [t for t, q in queues.items() if q]
    if left:
        raise ValueError(f"{sum(len(queues[t]) for t in left)} images or videos have no placeholder tokens left")
    return all_runs, per_sample, counts, all_sizes


def _expansion(rows: list[list[int]], items: list[VisualItem]) -> int:
    """r > 1 when the rows are r consecutive copies of a batch whose media are `items`."""
    have = sum(item.length for item in items)
    if not have:
        return 1
    need = sum(row.count(token) for row in rows for token in {item.token_id for item in items})
    repeat = need // have
    batch = len(rows)
    if repeat <= 1 or need != repeat * have or batch % repeat:
        return 1
    same = all(rows[g * repeat + r] == rows[g * repeat] for g in range(batch // repeat) for r in range(repeat))
    return repeat if same else 1
