"""PyramidDrop's layer-K preview, plain torch: the truth the CPU path and the Triton kernel are tested against.

PyramidDrop ranks the visual tokens at stage K by the attention that the last prompt token pays
them in layer K itself, on layer K's unpruned input (official code: github.com/Cooperx521/PyramidDrop,
`llava/model/modeling_llama_pdrop.py`, `pdrop_rank_drop`: `input_layernorm`, `q_proj`, `k_proj`,
RoPE, the softmax row of the last token, heads averaged). For a Llama-style layer (RMSNorm with
the weight applied in the input dtype, biasless or biased q/k projections, rotate-half RoPE)::

    x = w * (h * rsqrt(mean(h^2) + eps))           # [B, L, D], the layer's input norm
    q = rope(x[:, L-1] @ Wq^T + bq)                 # [B, H, d], the last row only
    k = rope(x @ Wk^T + bk)                         # [B, Hkv, L, d]
    s[b, l] = weight[b] * sum_h softmax_l(q[b, h] . k[b, h // g, l] * scale)[l]

over the keys `key_mask` allows (the last row sees every earlier key: no causal mask is needed);
a masked key's logit is float32's lowest value, so it gets exactly 0 whenever its sample has a
real key (a sample with none, only padding, gets 1 / L per head: its weight, 0 for a padding
row, decides). Heads are summed in float32 (the official code averages them: the same order).
"""

from __future__ import annotations

import torch

_NAME = "preview_scores"


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def validate_inputs(
    hidden: torch.Tensor, norm_weight: torch.Tensor, wq: torch.Tensor, bq: torch.Tensor | None, wk: torch.Tensor,
    bk: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
    key_mask: torch.Tensor | None, weights: torch.Tensor | None, scale: float | None,
) -> float:
    """Check shapes, dtypes and devices; return the resolved scale (``d ** -0.5`` by default).

    Raises ValueError naming the bad argument, its shape and what is expected.
    """
    if hidden.dim() != 3 or not hidden.is_floating_point():
        raise ValueError(f"{_NAME}: hidden must be a float tensor [B, L, D], got {hidden.dtype} {_shape(hidden)}")
    B, L, D = hidden.shape
    if L == 0:
        raise ValueError(f"{_NAME}: hidden has no rows (L=0); the last row is the query")
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        raise ValueError(f"{_NAME}: heads={heads} must be a positive multiple of kv_heads={kv_heads}")
    if wq.dim() != 2 or wq.shape[1] != D or wq.shape[0] % heads:
        raise ValueError(f"{_NAME}: wq must be [H * d, D] with H={heads}, D={D}, got {_shape(wq)}")
    d = wq.shape[0] // heads
    if d % 2:
        raise ValueError(f"{_NAME}: the head size d={d} must be even (rotate-half RoPE)")
    if wk.shape != (kv_heads * d, D):
        raise ValueError(f"{_NAME}: wk must be [Hkv * d, D] = [{kv_heads * d}, {D}], got {_shape(wk)}")
    if norm_weight.shape != (D,):
        raise ValueError(f"{_NAME}: norm_weight must be [D] = [{D}], got {_shape(norm_weight)}")
    for name, bias, rows in (("bq", bq, heads * d), ("bk", bk, kv_heads * d)):
        if bias is not None and bias.shape != (rows,):
            raise ValueError(f"{_NAME}: {name} must be [{rows}] or None, got {_shape(bias)}")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dim() != 3 or table.shape[0] not in (1, B) or table.shape[1:] != (L, d):
            raise ValueError(f"{_NAME}: {name} must be [B|1, L, d] = [{B}|1, {L}, {d}], got {_shape(table)}")
    if key_mask is not None and (key_mask.shape != (B, L) or key_mask.dtype != torch.bool):
        raise ValueError(f"{_NAME}: key_mask must be a bool tensor [B, L] = [{B}, {L}], got "
                         f"{key_mask.dtype} {_shape(key_mask)}")
    if weights is not None and (weights.shape != (B, 1) or not weights.is_floating_point()):
        raise ValueError(f"{_NAME}: weights must be a float tensor [B, 1] = [{B}, 1], got "
                         f"{weights.dtype} {_shape(weights)}")
    tensors = {"norm_weight": norm_weight, "wq": wq, "bq": bq, "wk": wk, "bk": bk, "cos": cos, "sin": sin,
               "key_mask": key_mask, "weights": weights}
    for name, t in tensors.items():
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{_NAME}: {name} is on {t.device} but hidden is on {hidden.device}")
    if scale is None:
        return d**-0.5
    if not (float(scale) > 0 and float(scale) != float("inf")):
        raise ValueError(f"{_NAME}: scale must be a positive finite number, got {scale}")
    return float(scale)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [..., d]: (-x2, x1) for the halves x1, x2 (the Llama RoPE's rotation)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def preview_scores(
    hidden: torch.Tensor, norm_weight: torch.Tensor, eps: float, wq: torch.Tensor, bq: torch.Tensor | None,
    wk: torch.Tensor, bk: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
    *, key_mask: torch.Tensor | None = None, weights: torch.Tensor | None = None, scale: float | None = None,
) -> torch.Tensor:
    """The last row's attention over every key, summed over heads: ``[B, L]`` float32.

    Args:
        hidden: ``[B, L, D]`` the layer's input (any float dtype).
        norm_weight, eps: the layer's input RMSNorm (weight ``[D]``, applied in hidden's dtype).
        wq, bq: the query projection ``[H * d, D]`` and its bias ``[H * d]`` or None.
        wk, bk: the key projection ``[Hkv * d, D]`` and its bias or None.
        cos, sin: ``[B|1, L, d]`` the layer's RoPE rows.
        heads, kv_heads: H and Hkv (query head h reads key head ``h // (H // Hkv)``).
        key_mask: ``[B, L]`` bool, True for real keys (None: all real).
        weights: ``[B, 1]`` float, the last row's weight per sample (None: 1).
        scale: the logit scale (``d ** -0.5`` by default).

    Returns:
        ``[B, L]`` float32, 0 on masked keys (of a sample with a real key).
    """
    scale = validate_inputs(hidden, norm_weight, wq, bq, wk, bk, cos, sin, heads, kv_heads, key_mask, weights, scale)
    B, L, _ = hidden.shape
    d = wq.shape[0] // heads
    h32 = hidden.to(torch.float32)
    x = norm_weight * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(hidden.dtype)
    q = torch.nn.functional.linear(x[:, -1:], wq, bq).view(B, 1, heads, d).transpose(1, 2)  # [B, H, 1, d]
    k = torch.nn.functional.linear(x, wk, bk).view(B, L, kv_heads, d).transpose(1, 2)  # [B, Hkv, L, d]
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)  # [B|1, 1, L, d]
    q = q * c[:, :, -1:] + rotate_half(q) * s[:, :, -1:]
    k = k * c + rotate_half(k) * s
    k = k.repeat_interleave(heads // kv_heads, dim=1)  # [B, H, L, d]
    logits = torch.einsum("bhd,bhld->bhl", q[:, :, 0].float(), k.float()) * scale  # [B, H, L]
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, :], torch.finfo(torch.float32).min)
    out = torch.softmax(logits, dim=-1).sum(dim=1)  # [B, L]
    return out if weights is None else out * weights.float()
