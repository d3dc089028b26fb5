"""Weighted attention scores, plain torch: the truth the Triton kernel is tested against.

FastV and AdaptInfer score visual tokens by how much a few chosen query rows
attend to them. For each sample ``b`` and key ``l``::

    s[b, l] = sum_h sum_t weights[b, (h,) t] * softmax_l(q[b, h, t] . k[b, h // g, l] * scale)[l]

The weights are one per query row ``[B, T]`` (FastV) or one per head and row
``[B, H, T]`` (AdaptInfer's per-head text prior), with keys masked out by padding (``key_mask``) and by causality
(``l <= query_positions[b, t]``). Masked keys get probability 0, and a row
whose allowed key set is empty contributes 0 instead of NaN.

This reference materialises the ``[B, Hkv, g, T, L]`` probabilities in fp32;
the Triton kernel computes the same numbers without ever storing them.
"""

from __future__ import annotations

import torch

_NAME = "attention_scores"


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def validate_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor | None,
    query_positions: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    scale: float | None,
    return_query_block: bool,
    per_head_block: bool = False,
    check_positions: bool = True,
) -> float:
    """Check shapes, dtypes, devices and position values; return the resolved scale.

    Raises ValueError naming the bad argument, its shape or values, and what
    is expected. Shared by every backend so they reject the same inputs.
    weights None: not given yet (computed later from the query block), not checked.
    check_positions=False skips the range check of the position *values*, which reads them on
    the host (a device sync): for callers whose positions are slot indices by construction.
    """
    if q.dim() != 4:
        raise ValueError(f"{_NAME}: q must be 4-D [B, H, T, d], got shape {_shape(q)}")
    B, H, T, d = q.shape
    if k.dim() != 4 or k.shape[0] != B or k.shape[3] != d:
        raise ValueError(
            f"{_NAME}: k must be [B, Hkv, L, d] = [{B}, Hkv, L, {d}] to match q {_shape(q)}, "
            f"got shape {_shape(k)}"
        )
    Hkv, L = k.shape[1], k.shape[2]
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(
            f"{_NAME}: the H={H} query heads of q must be a positive multiple of the "
            f"Hkv={Hkv} key heads of k (grouped-query attention), got q {_shape(q)}, k {_shape(k)}"
        )
    if not q.is_floating_point() or q.dtype != k.dtype:
        raise ValueError(
            f"{_NAME}: q and k must share one floating dtype, got q {q.dtype} and k {k.dtype}"
        )
    if weights is not None and (weights.shape not in ((B, T), (B, H, T)) or not weights.is_floating_point()):
        raise ValueError(
            f"{_NAME}: weights must be a float tensor [B, T] = [{B}, {T}] or [B, H, T] = [{B}, {H}, {T}], "
            f"got {weights.dtype} of shape {_shape(weights)}"
        )
    others = {"k": k, "weights": weights, "query_positions": query_positions, "key_mask": key_mask}
    for name, t in others.items():
        if t is not None and t.device != q.device:
            raise ValueError(f"{_NAME}: {name} is on {t.device} but q is on {q.device}")
    if key_mask is not None and (key_mask.shape != (B, L) or key_mask.dtype != torch.bool):
        raise ValueError(
            f"{_NAME}: key_mask must be a bool tensor [B, L] = [{B}, {L}] (True = valid key), "
            f"got {key_mask.dtype} of shape {_shape(key_mask)}"
        )
    if query_positions is not None:
        if query_positions.shape != (B, T) or query_positions.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"{_NAME}: query_positions must be an integer tensor (int64 or int32) "
                f"[B, T] = [{B}, {T}], "
                f"got {query_positions.dtype} of shape {_shape(query_positions)}"
            )
        if check_positions and query_positions.numel() > 0:
            lo, hi = int(query_positions.min()), int(query_positions.max())
            if lo < 0 or hi >= L:
                raise ValueError(
                    f"{_NAME}: query_positions must index the L={L} keys, i.e. lie in "
                    f"[0, {L - 1}], got values in [{lo}, {hi}]"
                )
    if per_head_block and not return_query_block:
        raise ValueError(f"{_NAME}: per_head_block=True only shapes the block of return_query_block=True")
    if return_query_block and query_positions is None:
        raise ValueError(
            f"{_NAME}: return_query_block=True needs query_positions, the key index of "
            "each query row, to know which key columns belong to the query rows"
        )
    if scale is None:
        return d**-0.5
    scale = float(scale)
    if not (scale > 0 and scale != float("inf")):
        raise ValueError(f"{_NAME}: scale must be a positive finite number, got {scale}")
    return scale


def allowed_keys(
    B: int,
    T: int,
    L: int,
    query_positions: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """Which keys each query row may attend to: bool ``[B, T, L]``."""
    allowed = torch.ones(B, T, L, dtype=torch.bool, device=device)
    if key_mask is not None:
        allowed &= key_mask[:, None, :]
    if query_positions is not None:
        key_index = torch.arange(L, device=device)
        allowed &= key_index[None, None, :] <= query_positions[:, :, None]
    return allowed


def attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    *,
    query_positions: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_query_block: bool = False,
    per_head_block: bool = False,
    check_positions: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weighted softmax attention of chosen query rows, reduced to one score per key.

    Args:
        q: ``[B, H, T, d]`` chosen query rows, after RoPE, any float dtype.
        k: ``[B, Hkv, L, d]`` all keys, after RoPE, same dtype; query head ``h``
            reads key head ``h // (H // Hkv)`` (grouped-query attention).
        weights: ``[B, T]`` float weight of each query row (0 ignores the row),
            or ``[B, H, T]``, a weight per query head and row.
        query_positions: ``[B, T]`` integer key index of each query row, or None.
            When given, row ``t`` may attend key ``l`` only if
            ``l <= query_positions[b, t]`` (causal).
        key_mask: ``[B, L]`` bool, True for real keys, False for padding.
        scale: logit scale, ``d ** -0.5`` by default.
        return_query_block: also return the attention among the query rows.
        per_head_block: return that block per query head, ``[B, H, T, T]``.

    Returns:
        ``s``: ``[B, L]`` float32 weighted scores, 0 on masked keys.
        ``qq``: ``[B, T, T]`` float32 with ``qq[b, t, u]`` the probability that
        row ``t`` gives to key ``query_positions[b, u]``, summed over heads
        (unweighted), or ``[B, H, T, T]`` per head with ``per_head_block``, or
        None unless ``return_query_block``.
    """
    scale = validate_inputs(
        q, k, weights, query_positions, key_mask, scale, return_query_block, per_head_block, check_positions
    )
    B, H, T, d = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    group = H // Hkv
    qg = q.float().reshape(B, Hkv, group, T, d)  # [B, Hkv, g, T, d]
    logits = torch.einsum("bkgtd,bkld->bkgtl", qg, k.float()).mul_(scale)  # [B, Hkv, g, T, L]
    allowed = allowed_keys(B, T, L, query_positions, key_mask, q.device)  # [B, T, L]
    # A row with no allowed key would softmax all -inf to NaN, so it keeps its
    # raw logits here and is zeroed after the softmax.
    row_live = allowed.any(dim=-1, keepdim=True)  # [B, T, 1]
    logits.masked_fill_((~allowed & row_live)[:, None, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    del logits
    probs.mul_(row_live[:, None, None])
    if weights.dim() == 2:
        s = torch.einsum("bkgtl,bt->bl", probs, weights.float())
    else:
        s = torch.einsum("bkgtl,bkgt->bl", probs, weights.float().reshape(B, Hkv, group, T))
    if not return_query_block:
        return s, None
    columns = query_positions.long()  # type: ignore[union-attr]
    if per_head_block:
        per_head = probs.reshape(B, H, T, L)
        return s, per_head.gather(-1, columns[:, None, None, :].expand(B, H, T, T))
    per_row = probs.sum(dim=(1, 2))  # [B, T, L]
    return s, per_row.gather(-1, columns[:, None, :].expand(B, T, T))
