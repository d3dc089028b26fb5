"""What a policy needs from the engine: one frozen declaration per policy class.

A policy class states everything the engine must do for it in `needs: ClassVar[Needs]`:
where it may run, which attention the engine captures for it and from which query rows,
what it reads from the vision tower, and what it returns. The engine builds each stage's
`StageInput` from this declaration alone (see `pruneware.engine.stage_inputs`); it never asks
which class a policy is or what it is called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Place = Literal["pre", "llm", "vit"]
AttentionSource = Literal["previous", "own"]
Query = Literal["last", "text", "post-image"]
VisionRead = Literal["attention", "keys", "resize"]
Output = Literal["select", "merge", "recycle"]


@dataclass(frozen=True)
class Needs:
    """A policy class's declaration of what it needs (all fields optional; the defaults are a
    plain selection policy that reads only the visual tokens' states, anywhere).

    Attributes:
        where: where the policy may run: "pre" (on the language model's input embeddings),
            "llm" (before a decoder layer K) and "vit" (in or before the vision tower: `vitK`,
            `pre-vit`, on its 2x2 merge units). None: wherever its inputs exist, i.e. "pre" unless
            it reads attention from inside the language model, "llm" unless it merges into new
            embeddings or reads the vision tower, "vit" for selection policies that read no text and
            no more than the tower's own attention.
        attention: the attention the engine captures for `StageInput.attention`: None (none),
            "previous" (what layer K-1 ran; FastV, AdaptInfer, SparseVLM, DART) or "own" (layer
            K's own attention on its unpruned input, previewed before the stage prunes it;
            PyramidDrop).
        captures: per slot, "attention" (the weighted attention the query rows pay it) or
            "key-norm" (the L1 norm of its key over every key head, no softmax; DART's pivots).
        query: the query rows: "last" (the last token), "text" (every real text token) or
            "post-image" (the real text tokens after the sample's last visual token).
        query_block: None, or the attention among the query rows that `Policy.row_weights`
            receives: "summed" over heads [B, T, T] or "per-head" [B, H, T, T].
        raters: only some query rows count, chosen once per prefill by `Policy.raters` from the
            language model's input embeddings (SparseVLM); the others reach `row_weights` invalid.
        text: `StageInput.text`: the query rows' states and captured values. Without attention
            the rows are read from the stage's states alone, anywhere (CDPruner's instruction).
        final_norm: the states (visual and text) pass through the language model's final norm first.
        vision: what a `pre` stage reads from the vision tower: "attention" (per-token scores),
            "keys" (head-averaged keys at that layer), "resize" (the tower runs on resized pixels).
        vision_features: serving integrations (vLLM) score the pre-projector vision features
            rather than the projected embeddings.
        states: False when the kept set depends only on token counts and the seed (`random`), never
            on the tokens' states: serving engines (the vLLM plugin) can then lay a stage inside the
            language model out before the forward step.
        output: what the policy returns: "select" (indices, from `select`/`score`), "merge" (new
            embeddings from `merge`, `pre` only) or "recycle" (in the language model, `merge`
            keeps slots and gives some of them new states; positions and masks stay the slots').
    """

    where: tuple[Place, ...] | None = None
    attention: AttentionSource | None = None
    captures: Literal["attention", "key-norm"] = "attention"
    query: Query = "last"
    query_block: Literal["summed", "per-head"] | None = None
    raters: bool = False
    text: bool = False
    final_norm: bool = False
    vision: tuple[VisionRead, ...] = ()
    vision_features: bool = False
    output: Output = "select"
    states: bool = True

    def __post_init__(self) -> None:
        vit = self.attention is None and not self.text and self.output == "select" and set(self.vision) <= {"attention"}
        possible = tuple(p for p, ok in (("pre", self.attention is None), ("llm", not self.merges and not self.vision),
                                         ("vit", vit)) if ok)
        if self.where is None:
            object.__setattr__(self, "where", possible)
        elif not set(self.where) <= set(possible):
            raise ValueError(f"{self}: it can run only at {possible or 'nowhere'} (attention inside the language "
                             "model rules out 'pre'; merging or reading the vision tower rules out 'llm')")
        if not self.where:
            raise ValueError(f"{self}: a policy that reads attention inside the language model can neither merge "
                             "into new embeddings nor read the vision tower")
        attention_only = (self.captures != "attention", self.query_block is not None, self.raters, self.final_norm)
        if self.attention is None and any(attention_only):
            raise ValueError(f"{self}: captures, query blocks, raters and the final norm need attention=...")
        if self.attention is None and self.query != "last" and not self.text:
            raise ValueError(f"{self}: query rows need attention=... (or text=True: the rows read as text)")

    @property
    def pre(self) -> bool:
        """May run at `pre`."""
        return "pre" in self.where  # type: ignore[operator]

    @property
    def llm(self) -> bool:
        """May run before a decoder layer K."""
        return "llm" in self.where  # type: ignore[operator]

    @property
    def vit(self) -> bool:
        """May run in or before the vision tower (`vitK`, `pre-vit`)."""
        return "vit" in self.where  # type: ignore[operator]

    @property
    def merges(self) -> bool:
        """Returns new embeddings (`pre` only)."""
        return self.output == "merge"

    @property
    def recycles(self) -> bool:
        """Gives some kept slots new states inside the language model."""
        return self.output == "recycle"


def query_rows(
    query: Query, visual: torch.Tensor, real: torch.Tensor, width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] slot indices of the `query` rows (left-aligned) and their validity.

    visual, real: [B, Ls] bool (visual slots; slots holding a real, unpadded token); `query` as
    in `Needs.query`. width: T, when the caller knows on the host an upper bound of any
    sample's row count (rows past a sample's count are invalid); None: the most rows of any
    sample, read on the host (a device sync).
    """
    if query == "last":
        rows = torch.full((real.shape[0], 1), real.shape[1] - 1, device=real.device)
        return rows, real[:, -1:]
    text = real & ~visual
    if query == "post-image":
        slot = torch.arange(real.shape[1], device=real.device)
        last_visual = torch.where(visual, slot, -1).max(dim=1).values  # [B], -1 without visual slots
        text &= slot[None] > last_visual[:, None]
    counts = text.sum(dim=1)
    width = int(counts.max()) if width is None else min(width, real.shape[1])
    order = torch.sort((~text).to(torch.int8), dim=1, stable=True).indices[:, :width]
    row_valid = torch.arange(order.shape[1], device=real.device)[None] < counts[:, None]
    return order, row_valid
