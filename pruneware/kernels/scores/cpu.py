"""Weighted attention scores on CPU tensors: the reference's numbers in as few torch ops as possible.

Same contract as ``reference.py`` (and tested against it). At batch 1 a scored stage is bound
by the host, one dispatch per torch op, so this path issues each op once, on the largest
tensors it can: one einsum for the logits, a mask built only when one is needed (no causal
mask when no query position is given, no padding mask when no key mask is), one softmax in
place, and when the weights come from the query block (``weights`` a callable, AdaptInfer's
text prior), that block and the weighted sum from the same probabilities, not a second
softmax. A row with no allowed key contributes 0, as in the reference: its softmax of -inf
only is NaN, and the keys it may not see (all of them) are set to 0 afterwards.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .reference import validate_inputs

Weights = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def probabilities(
    q: torch.Tensor, k: torch.Tensor, scale: float, query_positions: torch.Tensor | None,
    key_mask: torch.Tensor | None, live_rows: bool = False,
) -> torch.Tensor:
    """Softmax rows float32, 0 at keys a row may not see (a row that may see none is all 0):
    ``[B, H, T, L]`` when every query head has its own key head, else ``[B, Hkv, g, T, L]``
    (grouped-query attention, without repeating k). live_rows: the caller promises that every
    row it weighs sees a key; a row that sees none then gets finite values (the lowest float
    stands for -inf, so it is uniform, not NaN), one op fewer than zeroing it."""
    B, H, T, d = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    if Hkv == H:
        logits = torch.einsum("bhtd,bhld->bhtl", _float(q), _float(k))
    else:
        logits = torch.einsum("bkgtd,bkld->bkgtl", _float(q).reshape(B, Hkv, H // Hkv, T, d), _float(k))
    heads = (1,) * (logits.dim() - 3)  # the head dims, broadcast by the masks
    allowed = None  # [B, 1(, 1), T|1, L] bool: keys a row may see
    if query_positions is not None:
        allowed = torch.arange(L, device=q.device) <= query_positions.reshape(B, *heads, T, 1)
    if key_mask is not None:
        real = key_mask.reshape(B, *heads, 1, L)
        allowed = real if allowed is None else allowed.logical_and_(real)
    if allowed is None:
        return torch.softmax(logits.mul_(scale), dim=-1)
    if live_rows:  # exactly 0 at a masked key of a row that sees a real key: exp underflows
        return torch.softmax(torch.where(allowed, logits.mul_(scale), torch.finfo(logits.dtype).min), dim=-1)
    # `where`, not a masked fill of the negated mask: one op fewer, the same numbers.
    probs = torch.softmax(torch.where(allowed, logits.mul_(scale), float("-inf")), dim=-1)
    # A row that may see no key is NaN here (a softmax of -inf only): it contributes 0. A NaN
    # from q or k at a key the row sees is left alone, as in the reference.
    return torch.where(allowed, probs, 0.0)


def attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: Weights,
    *,
    query_positions: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_query_block: bool = False,
    per_head_block: bool = False,
    check_positions: bool = True,
    live_rows: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`pruneware.kernels.scores.reference.attention_scores` in few ops (CPU tensors).

    ``weights`` may also be a callable ``block -> [B, T] or [B, H, T]`` of the query block
    (``return_query_block`` and ``per_head_block`` then shape that block); the block is then
    computed from the same probabilities as the scores. Returns ``(s [B, L], qq or None)``.
    """
    from_block = not isinstance(weights, torch.Tensor)
    wants_block = return_query_block or from_block
    scale = validate_inputs(
        q, k, None if from_block else weights, query_positions, key_mask, scale, wants_block, per_head_block,
        check_positions,
    )
    B, H, T, _ = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    probs = probabilities(q, k, scale, query_positions, key_mask, live_rows)  # [B, H, T, L] or [B, Hkv, g, T, L]
    grouped = probs.dim() == 5
    block = None
    if wants_block:
        columns: torch.Tensor = query_positions  # type: ignore[assignment]  # validated: given with a block
        columns = columns if columns.dtype == torch.int64 else columns.long()
        if per_head_block:
            per_head = probs.view(B, H, T, L) if grouped else probs
            block = per_head.gather(-1, columns.view(B, 1, 1, T).expand(B, H, T, T))
        else:
            block = probs.sum(dim=(1, 2) if grouped else 1).gather(-1, columns.view(B, 1, T).expand(B, T, T))
    if from_block:
        weights = weights(block)  # type: ignore[operator]
        validate_inputs(q, k, weights, None, None, scale, False, False, False)
    w = _float(weights)  # type: ignore[arg-type]
    if not grouped:
        s = torch.einsum("bhtl,bt->bl" if w.dim() == 2 else "bhtl,bht->bl", probs, w)
    elif w.dim() == 2:
        s = torch.einsum("bkgtl,bt->bl", probs, w)
    else:
        s = torch.einsum("bkgtl,bkgt->bl", probs, w.reshape(B, Hkv, H // Hkv, T))
    return s, (block if return_query_block else None)

