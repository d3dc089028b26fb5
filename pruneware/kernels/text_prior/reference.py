"""AdaptInfer's text-prior scoring, plain torch: the truth the CPU path and the Triton kernel are tested against.

Official code: github.com/weiczh02/AdaptInfer-base, `llava/model/language_model/score.py`
(`attn_postprocess_topk_with_t2t_weighting`). Per sample ``b`` and query head ``h``, with
``P[h, t, l]`` the softmax row of query row ``t`` over the keys it may see (causal at
``query_positions[t]``, ``key_mask``) and ``V`` the valid rows::

    B[h, t, u] = V[t] V[u] P[h, t, query_positions[u]]              # attention among the rows
    prior[h, i] = sum_t B[h, t, i] + sum_u B[h, i, u] - B[h, i, i]     # t2t + t2t^T - diag, column sums
    s[l] = sum_h sum_i prior[h, i] P[h, i, l]

``text_prior`` is the prior from a given block; ``text_prior_scores`` the whole score, built here
from the shared score kernel's reference (``pruneware.kernels.scores.reference``).
"""

from __future__ import annotations

import torch

from ..scores import reference as scores

_NAME = "text_prior"


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def validate_block(block: torch.Tensor, row_valid: torch.Tensor) -> None:
    """block: [B, H, T, T] float; row_valid: [B, T] bool on its device. Raises ValueError naming the argument."""
    if block.dim() != 4 or block.shape[2] != block.shape[3] or not block.is_floating_point():
        raise ValueError(f"{_NAME}: block must be a float tensor [B, H, T, T], got {block.dtype} {_shape(block)}")
    B, _, T, _ = block.shape
    if row_valid.shape != (B, T) or row_valid.dtype != torch.bool:
        raise ValueError(f"{_NAME}: row_valid must be a bool tensor [B, T] = [{B}, {T}], got "
                         f"{row_valid.dtype} {_shape(row_valid)}")
    if row_valid.device != block.device:
        raise ValueError(f"{_NAME}: row_valid is on {row_valid.device} but block is on {block.device}")


def text_prior(block: torch.Tensor, row_valid: torch.Tensor) -> torch.Tensor:
    """[B, H, T] float32 prior of each query row per head, from the block [B, H, T, T] among the
    rows (``block[b, h, t, u]``: the probability row t gives row u's key) and row_valid [B, T]."""
    validate_block(block, row_valid)
    valid = row_valid.float()
    both = torch.einsum("bi,bj->bij", valid, valid).unsqueeze(1)  # [B, 1, T, T]
    masked = block.float() * both
    return masked.sum(dim=2) + masked.sum(dim=3) - torch.diagonal(masked, dim1=2, dim2=3)


def text_prior_scores(
    q: torch.Tensor, k: torch.Tensor, query_positions: torch.Tensor, row_valid: torch.Tensor, *,
    key_mask: torch.Tensor | None = None, scale: float | None = None, query_run: slice | None = None,
) -> torch.Tensor:
    """``[B, L]`` float32: every key's attention from the query rows, weighted per head by the text prior.

    Args:
        q: ``[B, H, T, d]`` the query rows after RoPE; k: ``[B, Hkv, L, d]`` every key after RoPE
            (not repeated for grouped-query attention).
        query_positions: ``[B, T]`` integer key index of each row (causal: row t sees keys <= it).
        row_valid: ``[B, T]`` bool, the rows that count (a row that sees no key must be invalid).
        key_mask: ``[B, L]`` bool, True for real keys; scale: ``d ** -0.5`` by default.
        query_run: the rows' positions as one slice shared by every sample, known on the host
            (a hint the CPU path uses to slice instead of gather; ignored here).
    """
    scores.validate_inputs(q, k, None, query_positions, key_mask, scale, True, True, False)
    if row_valid.shape != query_positions.shape or row_valid.dtype != torch.bool:
        raise ValueError(f"{_NAME}: row_valid must be a bool tensor [B, T] = {list(query_positions.shape)}, got "
                         f"{row_valid.dtype} {_shape(row_valid)}")
    zeros = torch.zeros(q.shape[0], q.shape[2], dtype=torch.float32, device=q.device)
    _, block = scores.attention_scores(q, k, zeros, query_positions=query_positions, key_mask=key_mask, scale=scale,
                                       return_query_block=True, per_head_block=True, check_positions=False)
    prior = text_prior(block, row_valid)  # type: ignore[arg-type]
    return scores.attention_scores(q, k, prior, query_positions=query_positions, key_mask=key_mask, scale=scale,
                                   check_positions=False)[0]
