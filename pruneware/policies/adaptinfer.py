"""`adaptinfer`: text-guided dynamic scoring (AdaptInfer).

At the layer before each stage, take T, the attention among the text tokens (heads summed).
The prior of text token j is the column sum of T + T^T - diag(T): the attention j receives
from the other text tokens plus the attention it pays them. A visual token's score is the
prior-weighted attention the text tokens pay it. With `prior=last` the weight is 1 on the last
token, which is exactly FastV (a test checks this).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from pruneware.policies.attention import AttentionPolicy
from pruneware.policies.base import register_policy

PRIORS = ("text", "last")


@register_policy
@dataclass(frozen=True)
class AdaptInferPolicy(AttentionPolicy):
    name = "adaptinfer"
    query: ClassVar[Literal["last", "text"]] = "text"
    needs_query_block: ClassVar[bool] = True
    description = "AdaptInfer: text-prior-weighted text-to-visual attention, multi-stage."
    prior: str = "text"

    def __post_init__(self) -> None:
        if self.prior not in PRIORS:
            raise TypeError(f"prior must be one of {PRIORS}, got {self.prior!r}")

    def row_weights(self, query_block: torch.Tensor | None, row_valid: torch.Tensor) -> torch.Tensor:
        valid = row_valid.float()
        if self.prior == "last":
            # Rows are left-aligned per sample: the last valid row is the last text token.
            last = valid.sum(dim=1).long().clamp(min=1) - 1
            return torch.nn.functional.one_hot(last, valid.shape[1]).float() * valid
        assert query_block is not None
        block = query_block * valid[:, :, None] * valid[:, None, :]  # [B, T, T]
        diag = torch.diagonal(block, dim1=1, dim2=2)
        prior = block.sum(dim=1) + block.sum(dim=2) - diag  # column sums of T + T^T - diag(T)
        return prior * valid
