"""Recycling as a plan option: any selecting policy, at `pre` or before a decoder layer K, can
fold the tokens it prunes into the tokens it keeps instead of dropping them.

Written as stage parameters beside the policy's own, e.g. ``divprune[recycle=nearest]@pre:64``
or ``fastv[recycle=context;contexts=8]@3:64``:

  - ``recycle=nearest``: every pruned token joins the kept token whose state is most cosine-
    similar to its own, and each kept token becomes the weighted mean
    ``(x_k + w * sum(assigned)) / (1 + w * n_assigned)`` with ``w = recycle_weight`` (default 1:
    the plain mean of the kept token and the tokens merged into it, the size-weighted average
    of token merging; SparseVLM's clusters and VisionZip's contextual tokens also average).
    The policy keeps the whole budget; states change, slots and positions do not.
  - ``recycle=context``: VisionZip's contextual tokens (`visionzip.contextual_merge`, its
    official rule) inside the same budget: the policy keeps ``k - c`` tokens and the ``n - k + c``
    pruned ones, in slot order, are merged into ``c`` tokens at evenly strided targets by cosine
    similarity (each is its target plus the mean of the tokens merged into it); k kept in all.
    ``contexts`` sets c: a count, or a share of the budget (default 10/64, VisionZip's 54+10).
  - ``recycle=none`` (or no ``recycle``): the policy as it is.

Similarity is read from the stage's states (the projected embeddings at `pre`, layer K's input
in the language model; VisionZip itself compares the vision tower's keys). Recycling runs over a
sample's whole visual block (several images included), as SparseVLM's does. A stage that keeps
everything is unchanged. Policies with a `recycle` parameter of their own (`sparsevlm`) keep
their own rule; merging policies already merge and refuse these parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from pruneware.errors import PlanError
from pruneware.policies.base import MergeResult, Policy, StageInput
from pruneware.policies.needs import Needs
from pruneware.policies.visionzip import contextual_merge

RECYCLE_MODES = ("none", "nearest", "context")
RECYCLE_KEYS = ("recycle", "contexts", "recycle_weight")
DEFAULT_CONTEXT_SHARE = 10 / 64  # VisionZip's 54 dominant + 10 contextual at 64 tokens


def merge_into_nearest(hidden: torch.Tensor, kept: torch.Tensor, weight: float) -> torch.Tensor:
    """[k, D] the kept tokens' new states: each pruned token averaged into its most similar kept one.

    hidden: [n, D] one sample's visual states; kept: [k] sorted indices into them (k >= 1).
    A kept token that receives nothing keeps its state exactly.
    """
    n = hidden.shape[0]
    pruned_mask = torch.ones(n, dtype=torch.bool, device=hidden.device)
    pruned_mask[kept] = False
    if not bool(pruned_mask.any()):
        return hidden[kept]
    x = hidden.float()
    unit = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    assign = (unit[pruned_mask] @ unit[kept].T).argmax(dim=1)  # [n - k]: the kept token each joins
    sums = torch.zeros(kept.shape[0], x.shape[1], device=x.device).index_add_(0, assign, x[pruned_mask])
    sizes = torch.zeros(kept.shape[0], device=x.device).index_add_(0, assign, torch.ones_like(assign, dtype=x.dtype))
    merged = (x[kept] + weight * sums) / (1.0 + weight * sizes)[:, None]
    return torch.where(sizes[:, None] > 0, merged.to(hidden.dtype), hidden[kept])


@dataclass(frozen=True)
class RecycledPolicy(Policy):
    """A selecting policy whose pruned tokens are recycled into what it keeps (see the module).

    inner: the selecting policy; mode: "nearest" or "context"; contexts: c as a count (int) or a
    share of the budget (float); weight: `recycle_weight`; in_llm: the stage runs before a decoder
    layer (its declaration then says "recycle"; at `pre` it says "merge").
    """

    inner: Policy
    mode: str = "nearest"
    contexts: int | float = DEFAULT_CONTEXT_SHARE
    weight: float = 1.0
    in_llm: bool = False

    @property  # type: ignore[override]
    def name(self) -> str:
        return self.inner.name

    def __post_init__(self) -> None:
        inner = self.inner.needs
        place = "llm" if self.in_llm else "pre"  # "merge" runs at `pre` only, "recycle" in the language model
        needs = replace(inner, output="recycle" if self.in_llm else "merge", where=(place,), states=True)
        object.__setattr__(self, "_needs", needs)  # declared once: the engine reads it at every stage

    @property  # type: ignore[override]
    def needs(self) -> Needs:
        return self._needs  # type: ignore[attr-defined]

    def raters(self, embeds: torch.Tensor, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.inner.raters(embeds, visual, text)

    def row_weights(self, query_block: torch.Tensor | None, row_valid: torch.Tensor) -> torch.Tensor:
        return self.inner.row_weights(query_block, row_valid)

    def score(self, inputs: StageInput) -> torch.Tensor:
        return self.inner.score(inputs)

    def context_count(self, budget: int, n: int) -> int:
        """Contextual tokens in a budget of `budget` of `n` tokens (0 when nothing is pruned)."""
        if budget >= n or budget <= 1 or self.mode != "context":
            return 0
        c = self.contexts if isinstance(self.contexts, int) else max(1, round(budget * self.contexts))
        return max(0, min(c, budget - 1, n - budget))

    def merge(self, inputs: StageInput, counts: list[int]) -> MergeResult:
        """Per sample: the kept slots (sorted) and their states [k_b, D]."""
        sizes = inputs.token_counts()
        contexts = [self.context_count(k, n) for k, n in zip(counts, sizes, strict=True)]
        chosen = self.inner.select(inputs, [k - c for k, c in zip(counts, contexts, strict=True)])
        keep, embeds = [], []
        for b, (n, c) in enumerate(zip(sizes, contexts, strict=True)):
            hidden = inputs.hidden[b, :n]  # [n, D] (valid rows come first)
            kept = chosen[b].to(hidden.device).sort().values
            if kept.numel() == 0 or kept.numel() == n:
                keep.append(kept)
                embeds.append(hidden[kept])
            elif self.mode == "nearest":
                keep.append(kept)
                embeds.append(merge_into_nearest(hidden, kept, self.weight))
            else:
                pruned_mask = torch.ones(n, dtype=torch.bool, device=hidden.device)
                pruned_mask[kept] = False
                pruned = pruned_mask.nonzero().squeeze(1)  # slot order
                targets, merged = contextual_merge(hidden[pruned], hidden[pruned], c)
                slots, order = torch.cat([kept, pruned[targets]]).sort()
                keep.append(slots)
                embeds.append(torch.cat([hidden[kept], merged])[order])
        return MergeResult(keep, embeds, None)

    def select(self, inputs: StageInput, counts: list[int]) -> list[torch.Tensor]:
        return self.merge(inputs, counts).keep


def with_recycling(cls: type[Policy], params: dict, stage) -> Policy | None:
    """The stage's policy wrapped to recycle when its parameters ask for it (None: they do not).

    cls: the registered class; params: the stage's parameters (the recycling ones are read
    here, the rest build the policy); stage: the `Stage` (its place decides pre vs in-LLM).
    """
    if "recycle" in {f.name for f in fields(cls)} or not set(params) & set(RECYCLE_KEYS):
        return None  # no recycling asked, or the policy recycles by its own rule
    own = {k: v for k, v in params.items() if k not in RECYCLE_KEYS}
    mode = params.get("recycle")
    if mode is None:
        raise PlanError(f"stage {stage}: 'contexts' and 'recycle_weight' go with recycle=nearest|context")
    if mode not in RECYCLE_MODES:
        raise PlanError(f"stage {stage}: recycle={mode!r}; valid modes: {', '.join(RECYCLE_MODES)}")
    contexts = params.get("contexts", DEFAULT_CONTEXT_SHARE)
    if "contexts" in params and mode != "context":
        raise PlanError(f"stage {stage}: 'contexts' is a parameter of recycle=context")
    if isinstance(contexts, bool) or not isinstance(contexts, int | float) or contexts < 0 or (
        isinstance(contexts, float) and contexts > 1.0
    ):
        raise PlanError(f"stage {stage}: contexts={contexts!r}: a count >= 0 or a share of the budget in [0, 1]")
    weight = params.get("recycle_weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
        raise PlanError(f"stage {stage}: recycle_weight={weight!r}: a number >= 0 (1: the plain mean)")
    try:
        inner = cls(**own)
    except TypeError as err:
        raise PlanError(f"bad parameters for policy {stage.policy!r} in {stage}: {err}") from None
    if mode == "none":
        return inner
    if stage.in_vision:
        raise PlanError(f"stage {stage}: recycling runs at 'pre' or before a decoder layer, not in the vision tower")
    if inner.needs.output != "select":
        raise PlanError(
            f"stage {stage}: {stage.policy!r} merges by its own rule; recycle applies to selecting policies"
        )
    if not (inner.needs.llm if stage.where != "pre" else inner.needs.pre):
        return inner  # it cannot run at this place at all: the session's place check says so
    return RecycledPolicy(inner, mode, contexts, float(weight), in_llm=stage.where != "pre")
