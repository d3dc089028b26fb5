"""`adaptinfer`: text-guided dynamic scoring, as the official AdaptInfer code computes it.

Official code: github.com/weiczh02/AdaptInfer-base, `llava/model/language_model/score.py`
(`attn_postprocess_topk_with_t2t_weighting`) and `qwen2_vl/SparseQwen/score.py`.

At the layer before each stage, per head h, take T_h: the attention among the text tokens
*after the image* (the question and the assistant prefix; the official `text_token_start` is
the end of the visual block), read from the softmax over all keys. The prior of text token j
in head h is the column sum of T_h + T_h^T - diag(T_h): the attention j receives from those
tokens plus the attention it pays them. A visual token's score is
    sum_h sum_i prior_h[i] * A_h[i, visual],
the per-head prior times the per-head text-to-visual attention, summed over heads. With
`prior=last` the weight is 1 on the last token, which is exactly FastV (a test checks this).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pruneware.kernels.text_prior import text_prior, text_prior_scores
from pruneware.policies.attention import AttentionPolicy
from pruneware.policies.base import register_policy
from pruneware.policies.needs import Needs

PRIORS = ("text", "last")


@register_policy
@dataclass(frozen=True)
class AdaptInferPolicy(AttentionPolicy):
    name = "adaptinfer"
    needs: ClassVar[Needs] = Needs(attention="previous", query="post-image", query_block="per-head")
    description = "AdaptInfer: per-head text-prior-weighted attention of the post-image text, multi-stage."
    prior: str = "text"

    def __post_init__(self) -> None:
        if self.prior not in PRIORS:
            raise TypeError(f"prior must be one of {PRIORS}, got {self.prior!r}")

    def row_weights(self, query_block: torch.Tensor | None, row_valid: torch.Tensor) -> torch.Tensor:
        """[B, H, T] per-head prior (or [B, T] for `prior=last`); query_block: [B, H, T, T]."""
        valid = row_valid.float()
        if self.prior == "last":
            # Rows are left-aligned per sample: the last valid row is the last text token.
            last = valid.sum(dim=1).long().clamp(min=1) - 1
            return torch.nn.functional.one_hot(last, valid.shape[1]).float() * valid
        assert query_block is not None
        # Official: (t2t + t2t^T - diag_embed(diag)).sum(dim=2), the column sums, over the valid
        # rows and columns (an invalid row's prior is 0): `kernels.text_prior`, whose reference is that rule.
        return text_prior(query_block, row_valid)

    def fused_attention_scores(
        self, q_rows: torch.Tensor, key: torch.Tensor, row_valid: torch.Tensor, query_positions: torch.Tensor | None,
        key_mask: torch.Tensor | None, scale: float | None, query_run: slice | None,
    ) -> torch.Tensor | None:
        """The text prior's scores in one kernel call (`kernels.text_prior.text_prior_scores`: the
        block, the prior and the weighted sum from one softmax); `prior=last` composes (FastV's rule)."""
        if self.prior != "text" or query_positions is None:
            return None
        return text_prior_scores(q_rows, key, query_positions, row_valid, key_mask=key_mask, scale=scale,
                                 query_run=query_run)
