"""The policy contract, the shared top-k selection, and the policy registry.

A policy is a frozen dataclass registered by name. Selection policies implement `score`
(higher = keep) and inherit `select`, which splits each sample's budget over its images in
proportion to their current sizes (at least one token each) and takes the top-k per image.
Policies hold no run-time state: everything a call needs arrives in a `StageInput`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from pruneware.errors import PlanError
from pruneware.policies.needs import Needs


@dataclass
class TextRows:
    """Text tokens a policy reads beside the visual ones (policies with `Needs(text=True)`):
    the policy's query rows, e.g. the text after the last visual token.

    Attributes:
        hidden: [B, T, D] their states (the same transform as `StageInput.hidden`).
        valid: [B, T] bool, True for real rows (rows are left-aligned per sample).
        score: [B, T] float32: the captured per-slot value at these rows (see `StageInput.attention`);
            None for a policy that captures no attention.
    """

    hidden: torch.Tensor
    valid: torch.Tensor
    score: torch.Tensor | None


@dataclass
class StageInput:
    """What a stage sees, for a batch of B samples with up to N visual tokens each.

    Attributes:
        hidden: [B, N, D] the visual tokens' states (projected embeddings for `pre`, the
            input of decoder layer K otherwise); rows past a sample's count are zeros.
        valid: [B, N] bool, True for real visual tokens.
        image_ids: [B, N] long, which image (0-based within the sample) each token belongs to; -1 if invalid.
        attention: [B, N] float32 or None: attention mass the chosen query rows put on each
            visual token at layer K-1 (or K; only for policies with `needs.attention`).
        seed: derived from the session's seed and the stage index; random policies seed a
            torch.Generator with it per sample, so a sample's draw does not depend on the batch.
        layer: the decoder layer the stage runs before (0 for `pre`).
        vision_scores, vision_keys, vision_grids: what the vision tower gave a `pre` stage
            whose policy asks for it in `needs.vision` (see `pruneware.engine.vision_tower_reads`).
    """

    hidden: torch.Tensor
    valid: torch.Tensor
    image_ids: torch.Tensor
    attention: torch.Tensor | None
    seed: int
    layer: int
    grids: list[list[tuple[int, int]]] = field(default_factory=list)  # per sample, (h, w) per image
    vision_scores: torch.Tensor | None = None  # [B, N] the vision tower's score per token (policies with `needs.vision`)
    vision_keys: torch.Tensor | None = None  # [B, N, d] its keys at that layer, averaged over heads
    vision_grids: list[list[tuple[int, int]]] | None = None  # per sample, the grid the tower produced per image
    text: TextRows | None = None  # only for policies with `Needs(text=True)`
    sizes: list[list[int]] | None = None  # `image_sizes()` when the engine knows it on the host

    def token_counts(self) -> list[int]:
        """Valid visual tokens per sample (from the host-side sizes when known: no device sync)."""
        if self.sizes is not None:
            return [sum(s) for s in self.sizes]
        return self.valid.sum(dim=1).tolist()

    def all_valid(self) -> bool:
        """True when every row is full (known on the host only; False when not known)."""
        n = self.valid.shape[1]
        return self.sizes is not None and all(sum(s) == n for s in self.sizes)

    def image_sizes(self) -> list[list[int]]:
        """Tokens per image, per sample."""
        if self.sizes is not None:
            return [list(s) for s in self.sizes]
        out = []
        for row, ok in zip(self.image_ids, self.valid, strict=True):
            ids = row[ok]
            out.append(torch.bincount(ids).tolist() if ids.numel() else [])
        return out


def split_budget(sizes: list[int], count: int) -> list[int]:
    """Split `count` kept tokens over images of `sizes` tokens, in proportion, >= 1 each
    (none at all when `count` is 0)."""
    total = sum(sizes)
    if count <= 0:
        return [0] * len(sizes)
    if count >= total:
        return list(sizes)
    count = max(count, len(sizes))
    shares = [count * s / total for s in sizes]
    out = [max(1, min(s, int(share))) for s, share in zip(sizes, shares, strict=True)]
    order = sorted(range(len(sizes)), key=lambda i: shares[i] - int(shares[i]), reverse=True)
    while sum(out) < count:
        for i in order:
            if sum(out) < count and out[i] < sizes[i]:
                out[i] += 1
    while sum(out) > count:
        for i in reversed(order):
            if sum(out) > count and out[i] > 1:
                out[i] -= 1
    return out


def image_groups(inputs: StageInput, sizes: list[list[int]], counts: list[int]) -> dict[tuple[int, int], list[tuple[int, torch.Tensor]]]:
    """(sample, image) pairs grouped by (image size, budget), so a per-image selection runs each
    group as one batched call. sizes: per sample, tokens per image (`StageInput.image_sizes`);
    counts: per sample, tokens to keep (split over its images by `split_budget`). Values: (b,
    [n] the image's columns in sample b)."""
    groups: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
    for b, image_sizes in enumerate(sizes):
        for image, k in enumerate(split_budget(image_sizes, counts[b]) if image_sizes else []):
            members = (inputs.image_ids[b] == image).nonzero().squeeze(1)
            groups.setdefault((len(members), k), []).append((b, members))
    return groups


@dataclass
class MergeResult:
    """What a merging policy returns, per sample.

    Attributes:
        keep: sorted indices (into the sample's visual tokens) of the slot each merged token
            takes; it inherits that token's mask entry and, on 1-D RoPE models, its position.
            A list, or a [B, k] tensor (row b: sample b) when every sample keeps k.
        embeds: [k, D] the merged tokens' embeddings, in the order of `keep` (a list, or a
            [B, k, D] tensor with `keep`'s).
        grids: the pooled (h, w) grid of each image, for M-RoPE positions; None when the
            merged tokens form no grid and keep their slots' positions on M-RoPE models too.
    """

    keep: list[torch.Tensor] | torch.Tensor
    embeds: list[torch.Tensor] | torch.Tensor
    grids: list[list[tuple[int, int]]] | None


@dataclass(frozen=True)
class Policy:
    """Base class. Subclasses set `name`, declare `needs` and implement `score` or override
    `select` (or `merge`, for `Needs(output="merge" | "recycle")`)."""

    name: ClassVar[str] = ""
    needs: ClassVar[Needs] = Needs()  # what the engine must give it (see `pruneware.policies.needs`)
    description: ClassVar[str] = ""

    def raters(self, embeds: torch.Tensor, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """[B, L] bool: which of the `text` slots rate (policies with `Needs(raters=True)`).

        embeds: [B, L, D] the language model's input; visual, text: [B, L] bool.
        """
        raise NotImplementedError(f"policy {self.name!r} does not choose raters")

    def row_weights(self, query_block: torch.Tensor | None, row_valid: torch.Tensor) -> torch.Tensor:
        """Attention policies: [B, T] weight of each query row, or [B, H, T] one per head and row.

        query_block: attention among the query rows when `needs.query_block` is set: [B, T, T]
        summed over heads, or [B, H, T, T] per head; row_valid: [B, T] bool.
        """
        return row_valid.float()

    def fused_attention_scores(
        self, q_rows: torch.Tensor, key: torch.Tensor, row_valid: torch.Tensor, query_positions: torch.Tensor | None,
        key_mask: torch.Tensor | None, scale: float | None, query_run: slice | None,
    ) -> torch.Tensor | None:
        """Attention policies: their whole score [B, L] in one fused kernel call, or None (the
        default): the engine then composes the shared score kernel with `row_weights`.

        q_rows: [B, H, T, d] the query rows; key: [B, Hkv, L, d]; row_valid: [B, T] bool;
        query_positions: [B, T] their key slots; key_mask: [B, L] bool or None; query_run: the
        rows as one slice of slots shared by every sample, when known on the host.
        """
        return None

    def merge(self, inputs: StageInput, counts: list[int]) -> MergeResult:
        """Merging policies: new embeddings for the kept slots."""
        raise NotImplementedError(f"policy {self.name!r} selects tokens; it does not merge them")

    def score(self, inputs: StageInput) -> torch.Tensor:
        """[B, N] float scores; higher means more worth keeping."""
        raise NotImplementedError(f"policy {self.name!r} implements neither score() nor select()")

    def select(self, inputs: StageInput, counts: list[int]) -> list[torch.Tensor] | torch.Tensor:
        """Per sample, the sorted indices (into that sample's N visual tokens) to keep: a list,
        or a [B, k] tensor whose row b is sample b's when every sample keeps k.

        `counts[b]` is sample b's budget; it is split over the sample's images.
        """
        scores = self.score(inputs)
        scores = scores if scores.dtype == torch.float32 else scores.float()
        if not inputs.all_valid():  # padding rows must never be picked
            scores = scores.masked_fill(~inputs.valid, float("-inf"))
        return topk_per_image(scores, inputs, counts)


def topk_per_image(scores: torch.Tensor, inputs: StageInput, counts: list[int]) -> list[torch.Tensor] | torch.Tensor:
    """Top-k of `scores` [B, N] per image under the split budget; sorted indices per sample
    (a list, or one [B, k] tensor, whose rows are the samples', when every sample keeps k)."""
    sizes = inputs.image_sizes()
    single = all(len(s) <= 1 for s in sizes)
    if single and len(set(counts)) == 1 and counts[0] > 0:
        # One image per sample and one budget: a single batched top-k, kept as one tensor
        # (the engine reads it whole; splitting it per sample would be one more op).
        k = min(counts[0], scores.shape[1])
        return scores.topk(k, dim=1).indices.sort(dim=1).values
    out = []
    for b, image_sizes in enumerate(sizes):
        if not image_sizes:
            out.append(torch.zeros(0, dtype=torch.long, device=scores.device))
            continue
        parts = []
        for image, k in enumerate(split_budget(image_sizes, counts[b])):
            members = (inputs.image_ids[b] == image).nonzero().squeeze(1)
            top = scores[b, members].topk(k).indices
            parts.append(members[top])
        out.append(torch.cat(parts).sort().values)
    return out


_POLICIES: dict[str, type[Policy]] = {}


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator: register a policy under `cls.name`; duplicate names are rejected."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _POLICIES:
        raise ValueError(f"policy {cls.name!r} is already registered by {_POLICIES[cls.name].__name__}")
    if not isinstance(cls.needs, Needs):
        raise ValueError(f"{cls.__name__}.needs must be a Needs declaration, got {type(cls.needs).__name__}")
    _POLICIES[cls.name] = cls
    return cls


def policy_names(where: Callable[[Needs], bool] = lambda needs: True) -> str:
    """The registered policies whose declaration satisfies `where`, sorted and comma-separated
    (error messages list policies from here, never by hand)."""
    return ", ".join(sorted(n for n, cls in _POLICIES.items() if where(cls.needs)))


def get_policy(name: str) -> type[Policy]:
    try:
        return _POLICIES[name]
    except KeyError:
        raise PlanError(f"unknown policy {name!r}; valid policies: {policy_names()}") from None


def build_policy(stage) -> Policy:
    """The policy a `Stage` names, built from the stage's parameters (the one place policies are made)."""
    cls = get_policy(stage.policy)
    from pruneware.policies.recycle import with_recycling  # it builds on this module

    recycled = with_recycling(cls, dict(stage.params), stage)  # `recycle=...`: see policies/recycle.py
    if recycled is not None:
        return recycled
    try:
        return cls(**dict(stage.params))
    except TypeError as err:
        raise PlanError(f"bad parameters for policy {stage.policy!r} in {stage}: {err}") from None


def available() -> dict[str, type[Policy]]:
    return dict(_POLICIES)
