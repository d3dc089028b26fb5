"""PyramidDrop's layer-K preview on CPU float32 tensors, in few torch ops; same contract as ``reference.py``.

At batch 1 a stage is bound by the host, one dispatch per torch op (see
``pruneware.engine.profiling``), so this path issues each op once on the largest tensors:
  - the input RMSNorm in one ``rms_norm`` (in float32 the model's cast to the input dtype is a no-op);
  - ONE projection for q, k and their rotate-half images: the rows of ``[Wk; s Wq; R(Wk); s R(Wq)]``,
    where ``R`` permutes and negates each head's halves as ``rotate_half`` does to the outputs
    (exact: the same dot products, permuted and negated) and ``s`` is the logit scale (folded
    into q: the logits differ from ``(q . k) * s`` by rounding only). That stacked weight is made
    once per set of weights and scale, and kept while the parameters are unchanged (their
    ``_version`` and storage);
  - RoPE as one product with the stacked ``(cos, sin)`` and one sum over that pair
    (``x * cos + R(x) * sin``: the model's two products and one addition);
  - one ``einsum`` for every head's logits, one softmax, one weighted head sum.
q is projected for every row (the last is used) and the weights' rotated copies too: four widths of
the key projection where the module preview computes three, for fewer calls (what the launch
budget counts). On the cpu_overhead model the preview is no faster than the module calls (see
benchmarks/RESULTS.md, session 3). Other dtypes take the reference.
"""

from __future__ import annotations

import weakref

import torch

from . import reference
from .reference import validate_inputs

# id(wk) -> (a weak reference to wk, stamp, weight, bias); a tensor hashes by id but compares by value,
# so it cannot key a WeakKeyDictionary itself. Bounded: cleared when it outgrows a few models' layers.
_STACKED: dict[int, tuple] = {}
_MAX_ENTRIES = 256


def _stamp(*tensors: torch.Tensor | None) -> tuple:
    return tuple(None if t is None else (t.data_ptr(), t._version, t.shape) for t in tensors)


def _rotated(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of ``w`` ([heads * d, ...]) such that ``x @ R(w)^T == rotate_half(x @ w^T)`` per head."""
    per_head = w.reshape(heads, 2, -1, *w.shape[1:])  # [heads, 2 halves, d / 2, ...]
    return torch.cat((-per_head[:, 1], per_head[:, 0]), dim=1).reshape(w.shape)


def stacked_projection(
    wq: torch.Tensor, bq: torch.Tensor | None, wk: torch.Tensor, bk: torch.Tensor | None, heads: int, kv_heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``([Wk; s Wq; R(Wk); s R(Wq)], its bias or None)``: ``[2 (Hkv + H) d, D]``, made once per
    set of weights and scale ``s``."""
    stamp = (*_stamp(wq, bq, wk, bk), scale)
    hit = _STACKED.get(id(wk))
    if hit is not None and hit[0]() is wk and hit[1] == stamp:
        return hit[2], hit[3]
    with torch.no_grad():
        sq = wq * scale
        weight = torch.cat((wk, sq, _rotated(wk, kv_heads), _rotated(sq, heads))).contiguous()
        bias = None
        if bq is not None or bk is not None:
            zq = bq * scale if bq is not None else wq.new_zeros(wq.shape[0])
            zk = bk if bk is not None else wk.new_zeros(wk.shape[0])
            bias = torch.cat((zk, zq, _rotated(zk, kv_heads), _rotated(zq, heads)))
    if len(_STACKED) >= _MAX_ENTRIES:
        _STACKED.clear()
    _STACKED[id(wk)] = (weakref.ref(wk), stamp, weight, bias)
    return weight, bias


def preview_scores(
    hidden: torch.Tensor, norm_weight: torch.Tensor, eps: float, wq: torch.Tensor, bq: torch.Tensor | None,
    wk: torch.Tensor, bk: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
    *, key_mask: torch.Tensor | None = None, weights: torch.Tensor | None = None, scale: float | None = None,
) -> torch.Tensor:
    """:func:`pruneware.kernels.preview.reference.preview_scores` in few ops (CPU tensors): ``[B, L]`` float32."""
    tensors = (hidden, norm_weight, wq, wk, cos, sin)
    if any(t.dtype != torch.float32 for t in tensors) or hidden.device.type != "cpu":
        return reference.preview_scores(hidden, norm_weight, eps, wq, bq, wk, bk, cos, sin, heads, kv_heads,
                                        key_mask=key_mask, weights=weights, scale=scale)
    scale = validate_inputs(hidden, norm_weight, wq, bq, wk, bk, cos, sin, heads, kv_heads, key_mask, weights, scale)
    B, L, D = hidden.shape
    d = wq.shape[0] // heads
    weight, bias = stacked_projection(wq, bq, wk, bk, heads, kv_heads, scale)
    x = torch.nn.functional.rms_norm(hidden, (D,), norm_weight, eps)
    both = torch.nn.functional.linear(x, weight, bias).view(B, L, 2, kv_heads + heads, d)
    table = torch.stack((cos, sin), dim=2).view(cos.shape[0], L, 2, 1, d)
    roped = (both * table).sum(dim=2)  # [B, L, Hkv + H, d]: x * cos + rotate_half(x) * sin
    k, q = roped.split((kv_heads, heads), dim=2)  # q already scaled
    q = q[:, -1]  # [B, H, d]: the last row
    # Heads first, samples and keys last: the [B, L] key mask broadcasts as it is.
    if kv_heads == heads:
        logits = torch.einsum("bhd,blhd->hbl", q, k)  # [H, B, L]
    else:  # query head h reads key head h // g
        logits = torch.einsum("bkgd,blkd->kgbl", q.view(B, kv_heads, heads // kv_heads, d), k)  # [Hkv, g, B, L]
    if key_mask is not None:  # the lowest float, not -inf: a sample of padding only gets no NaN
        logits = torch.where(key_mask, logits, torch.finfo(torch.float32).min)
    probs = torch.softmax(logits, dim=-1)
    if weights is None:
        return probs.sum(dim=tuple(range(probs.dim() - 2)))
    return torch.einsum("hbl,bz->bl" if probs.dim() == 3 else "kgbl,bz->bl", probs, weights)
