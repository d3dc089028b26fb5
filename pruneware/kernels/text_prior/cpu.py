"""AdaptInfer's text-prior scoring on CPU tensors, in few torch ops: same contract as ``reference.py``.

At batch 1 a scored stage is bound by the host, one dispatch per torch op (see
``pruneware.engine.profiling``). One softmax gives the probabilities ``P``; the block among the
rows is a slice of it when the rows are one run of slots (``query_run``), else one gather; and
the prior and the weighted sum are contracted together, never materialised:
    s = sum_{h,i,t} V_i V_t (B_ti + B_it) P_i - sum_{h,i} V_i B_ii P_i = sum_{h,i,t} V_i V_t max(B_ti, B_it) P_i
(``einsum`` contracting four operands at once). The last form is exact because attention is
causal: of two rows at distinct slots, at most one sees the other, so one of B_ti, B_it is 0.
The causal mask of a run is the same for every forward of one shape and made once.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ..scores import reference as scores
from .reference import text_prior as _reference_prior
from .reference import validate_block


@lru_cache(maxsize=32)
def _run_causal(t: int, length: int, first: int, device: torch.device, inference: bool) -> torch.Tensor:
    """[T, L] bool: row j of a run starting at slot `first` sees keys <= first + j (made once, never written)."""
    return torch.arange(length, device=device)[None] <= torch.arange(first, first + t, device=device)[:, None]


def text_prior(block: torch.Tensor, row_valid: torch.Tensor) -> torch.Tensor:
    """The reference's prior (a few ops already: it is the rule itself)."""
    return _reference_prior(block, row_valid)


def text_prior_scores(
    q: torch.Tensor, k: torch.Tensor, query_positions: torch.Tensor, row_valid: torch.Tensor, *,
    key_mask: torch.Tensor | None = None, scale: float | None = None, query_run: slice | None = None,
) -> torch.Tensor:
    """:func:`pruneware.kernels.text_prior.reference.text_prior_scores` in few ops (CPU tensors): ``[B, L]`` float32."""
    scale = scores.validate_inputs(q, k, None, query_positions, key_mask, scale, True, True, False)
    B, H, T, d = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    if row_valid.shape != (B, T) or row_valid.dtype != torch.bool:
        raise ValueError(f"text_prior: row_valid must be a bool tensor [B, T] = [{B}, {T}], got "
                         f"{row_valid.dtype} {list(row_valid.shape)}")
    run = query_run if query_run is not None and query_run.stop - query_run.start == T == L - query_run.start else None
    qf = q if q.dtype == torch.float32 else q.float()
    kf = k if k.dtype == torch.float32 else k.float()
    if Hkv == H:
        logits, heads = torch.einsum("bhtd,bhld->bhtl", qf, kf), "h"  # [B, H, T, L]
    else:
        logits, heads = torch.einsum("bkgtd,bkld->bkgtl", qf.reshape(B, Hkv, H // Hkv, T, d), kf), "kg"
    lead = (1,) * len(heads)
    if run is not None:
        allowed = _run_causal(T, L, run.start, q.device, torch.is_inference_mode_enabled())  # [T, L]
    else:
        allowed = torch.arange(L, device=q.device) <= query_positions.reshape(B, *lead, T, 1)
    if key_mask is not None:
        allowed = allowed & key_mask.reshape(B, *lead, 1, L)
    # The lowest float, not -inf: a row that sees no key (invalid, by the contract: V = 0 drops it
    # from the prior and the sum) is uniform instead of NaN; a masked key of any other row is exactly 0.
    probs = torch.softmax(torch.where(allowed, logits.mul_(scale), torch.finfo(torch.float32).min), dim=-1)
    if run is not None:
        block = probs[..., run.start:]  # [B, heads.., T, T]: the rows' own keys, in row order
    else:
        columns = query_positions if query_positions.dtype == torch.int64 else query_positions.long()
        block = probs.gather(-1, columns.reshape(B, *lead, 1, T).expand(*probs.shape[:-1], T))
    valid = row_valid.to(torch.float32)
    # B + B^T - diag(B) is max(B, B^T), exactly: the rows sit at distinct slots, so of B_ti and
    # B_it one is a masked key's probability (exactly 0, see above) unless i = t, and both are >= 0.
    prior_block = torch.maximum(block, block.transpose(-1, -2))
    return torch.einsum(f"bt,b{heads}ti,bi,b{heads}il->bl", valid, prior_block, valid, probs)
