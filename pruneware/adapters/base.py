"""What pruneware needs to know about a model family, behind one small interface.

An adapter finds the decoder layers, the visual tokens (from token ids, never from offsets),
each image's token count and grid, and the kind of RoPE the language model uses.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from pruneware.errors import PlanError


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
    """

    image_ids: torch.Tensor
    grids: list[list[tuple[int, int]]]
    counts: list[int]
    sizes: list[list[int]] | None = None
    spans: list[tuple[int, int] | None] | None = None

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


@dataclass
class VisualInjections:
    """Features a model adds to the visual tokens' hidden states after its first decoder layers
    (Qwen3-VL DeepStack), kept in the model's own form so a pruned sequence can follow them.

    Attributes:
        mask: [B, L] bool, the language-model input positions that receive features.
        embeds: per layer i, [N, D] rows added after layer i to the masked positions, in
            row-major order (N = mask.sum()).
    """

    mask: torch.Tensor
    embeds: list[torch.Tensor]

    def add(self, hidden: torch.Tensor, layer: int, orig: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """hidden [B, Ls, D] after `layer`, whose slots hold input positions orig [B, Ls] (valid
        [B, Ls]): add the layer's rows of the slots still present, as the model itself would."""
        if layer >= len(self.embeds):
            return hidden
        mask = self.mask.to(hidden.device)
        rank = mask.flatten().long().cumsum(0).view_as(mask) - 1  # row of each masked position
        here = mask.gather(1, orig) & valid
        rows = self.embeds[layer].to(hidden.device, hidden.dtype)[rank.gather(1, orig)[here]]
        hidden = hidden.clone()
        hidden[here] = hidden[here] + rows
        return hidden


class Adapter:
    """Base class; one subclass per model family, registered by `config.model_type`."""

    model_types: ClassVar[tuple[str, ...]] = ()
    rope: ClassVar[Literal["1d", "mrope"]] = "1d"
    supports_merging: ClassVar[bool] = True  # merging policies (crosslmm) can run at `pre`
    resizes_pixels: ClassVar[bool] = False  # `resize` can lower the vision tower's input resolution

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    @property
    def base_model(self) -> nn.Module:
        """The multimodal base model (vision tower + projector + language model)."""
        return self.model.model

    @property
    def language_model(self) -> nn.Module:
        return self.base_model.language_model

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def text_config(self) -> Any:
        return self.config.text_config

    def visual_token_ids(self) -> list[int]:
        raise NotImplementedError

    def pooled_positions(
        self, mm_token_type_ids: torch.Tensor, grids: list[list[tuple[int, int]]], attention_mask: torch.Tensor,
        second_per_grid_ts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """M-RoPE models: positions of merged tokens on pooled grids. 1-D RoPE models never call this."""
        raise NotImplementedError(f"{type(self).__name__} has no M-RoPE positions")

    def position_inputs(self, input_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> dict[str, Any]:
        """What `merged_positions` will need from the base model's forward (kept per request)."""
        return {}

    def merged_positions(
        self, inputs: dict[str, Any], index: torch.Tensor, valid: torch.Tensor, grids: list[list[tuple[int, int]]],
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Positions of a `pre` stage's output when a merging policy pooled grids (M-RoPE models).

        inputs: from `position_inputs`; index, valid: [B, L0] kept input positions and slot
        validity; grids: per sample, each unit's pooled grid; mask: [B, L0] the new 2-D mask.
        1-D RoPE models keep positions and never call this.
        """
        raise NotImplementedError(f"{type(self).__name__} has no M-RoPE positions")

    def vision_grid(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
        """The grid argument of one vision-tower call (see `vision_tower`)."""
        return kwargs.get("grid_thw", args[1] if len(args) > 1 else None)

    def rope_tables(self, like: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for `positions` [B, L] (or [3, B, L]), in `like`'s dtype and device."""
        return self.language_model.rotary_emb(like, positions)

    def layer_group(self, layer: int) -> object:
        """Layers of one group share a pruned level's mask and RoPE tables; a family with
        per-layer attention types (e.g. sliding and full layers) returns each layer's type."""
        return 0

    def token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] int: 0 for text, nonzero (the modality) at visual placeholder tokens."""
        return torch.isin(input_ids, torch.tensor(self.visual_token_ids(), device=input_ids.device)).int()

    def vision_tower(self) -> nn.Module | None:
        """A module whose calls the session records as (output, `grid_thw`) pairs, passed to
        `layout` as `seen_vision` (dynamic-resolution models, whose grids `generate()` drops)."""
        return None

    def layout(self, input_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> VisualLayout:
        """Locate every image's tokens in `input_ids` [B, L].

        model_kwargs: the multimodal base model's forward kwargs, plus `seen_vision`.
        """
        raise NotImplementedError

    # the vision tower, for pre-LLM policies that read it (fastervlm, visionzip, resize) ----
    def vision_encoder(self) -> nn.Module | None:
        """The module one call of which encodes a batch of images (None: not supported)."""
        return None

    def vision_score_attention(self) -> nn.Module:
        """The vision attention module whose rows vision-side policies read."""
        raise PlanError(
            f"{type(self).__name__} cannot read its vision tower's attention; vision-side policies "
            "(fastervlm, visionzip) support LLaVA-1.5, Qwen2-VL and Qwen2.5-VL"
        )

    def vision_call_scores(
        self, query: torch.Tensor, key: torch.Tensor, scale: float | None, kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One call of `vision_score_attention`: (per-patch scores, per-patch keys averaged
        over heads) in the tower's own layout; `vision_image_scores` puts them in image order."""
        raise NotImplementedError

    def vision_image_scores(
        self, parts: list[tuple[torch.Tensor, torch.Tensor]], grid: torch.Tensor | None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The parts one encoder call produced -> per image, in call order, its visual tokens'
        scores [n] and keys [n, d] (row-major over the token grid)."""
        raise NotImplementedError

    def injection_layers(self) -> int:
        """n: the model adds features to the visual tokens after each of decoder layers 0..n-1."""
        return 0

    def take_injections(self, lm_kwargs: dict[str, Any]) -> VisualInjections | None:
        """Remove from the language model's prefill kwargs the per-layer features it would add
        to the visual tokens by position, and return them for the engine to add to the kept ones."""
        return None

    def _runs_to_layout(
        self, input_ids: torch.Tensor, sizes: list[int], grids: list[tuple[int, int]],
        rows: list[list[int]] | None = None,
    ) -> VisualLayout:
        """Cut the visual positions of each row, in reading order, into images of `sizes` tokens.
        rows: `input_ids.tolist()`, when the caller already read them."""
        token = self.visual_token_ids()[0]
        items = [VisualItem(token, (g,), (n,)) for n, g in zip(sizes, grids, strict=True)]
        return items_to_layout(input_ids, items, rows)


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
    return VisualLayout(image_ids.to(input_ids.device, input_ids.dtype), grids, counts, sizes, spans)


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
