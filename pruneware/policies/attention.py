"""The shared scoring path of attention-guided policies (FastV, AdaptInfer).

At the layer before a stage, the session takes the policy's query rows (the last token, every
text token, or the text after the last visual token), asks `row_weights` how much each row
counts (one weight per row, or one per head and row), and scores every visual token by the
weighted attention those rows pay it, summed over heads:
    s[b, l] = sum_h sum_t w[b, (h,) t] * softmax(q_ht . k_h / sqrt(d))[l]
computed by `pruneware.kernels.scores` without materialising the attention matrix.
FastV is the special case w = 1 on the last token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from pruneware.policies.base import Policy, StageInput


@dataclass(frozen=True)
class AttentionPolicy(Policy):
    """Base for policies scored by attention rows captured at layer K-1 (or at K, see `attention_layer`)."""

    needs_attention: ClassVar[bool] = True
    pre_llm: ClassVar[bool] = False
    # "last": the last token; "text": every real text token; "post-image": the real text
    # tokens after the sample's last visual token (the question and the assistant prefix).
    query: ClassVar[Literal["last", "text", "post-image"]] = "last"
    needs_query_block: ClassVar[bool] = False
    per_head: ClassVar[bool] = False  # the query block comes per head, [B, H, T, T]
    # "previous": the attention layer K-1 ran (FastV, AdaptInfer); "own": layer K's attention
    # on its own, unpruned input, previewed before the stage prunes it (PyramidDrop).
    attention_layer: ClassVar[Literal["previous", "own"]] = "previous"
    # What is captured per slot: the weighted attention rows, or the L1 norm of each slot's
    # key over all key heads (DART's pivots), with no softmax at all.
    captures: ClassVar[Literal["attention", "key-norm"]] = "attention"
    needs_text: ClassVar[bool] = False  # StageInput.text: the query rows' states and captured values
    final_norm: ClassVar[bool] = False  # states pass through the language model's final norm first
    # Only some query rows count, chosen once from the language model's input embeddings by
    # `raters` (SparseVLM); the session passes the others to `row_weights` as invalid.
    rates_text: ClassVar[bool] = False

    def raters(self, embeds: torch.Tensor, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """[B, L] bool: which of the `text` slots rate (policies with `rates_text`).

        embeds: [B, L, D] the language model's input; visual, text: [B, L] bool.
        """
        raise NotImplementedError(f"policy {self.name!r} does not choose raters")

    def query_rows(self, visual: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T] slot indices of the query rows this policy reads (left-aligned) and their validity.

        visual, real: [B, Ls] bool (visual slots; slots holding a real, unpadded token). `query`
        says which rows: "last" (the last slot), "text" (every real text slot) or "post-image"
        (the real text slots after the sample's last visual slot).
        """
        if self.query == "last":
            rows = torch.full((real.shape[0], 1), real.shape[1] - 1, device=real.device)
            return rows, real[:, -1:]
        text = real & ~visual
        if self.query == "post-image":
            slot = torch.arange(real.shape[1], device=real.device)
            last_visual = torch.where(visual, slot, -1).max(dim=1).values  # [B], -1 without visual slots
            text &= slot[None] > last_visual[:, None]
        counts = text.sum(dim=1)
        order = torch.sort((~text).to(torch.int8), dim=1, stable=True).indices[:, : int(counts.max())]
        row_valid = torch.arange(order.shape[1], device=real.device)[None] < counts[:, None]
        return order, row_valid

    def row_weights(self, query_block: torch.Tensor | None, row_valid: torch.Tensor) -> torch.Tensor:
        """[B, T] weight of each query row, or [B, H, T] one per head and row.

        query_block: attention among the query rows when `needs_query_block`: [B, T, T]
        summed over heads, or [B, H, T, T] when `per_head`; row_valid: [B, T] bool.
        """
        return row_valid.float()

    def score(self, inputs: StageInput) -> torch.Tensor:
        if inputs.attention is None:
            raise RuntimeError(f"{self.name} needs captured attention rows; the session did not provide them")
        return inputs.attention
