"""A 1-D RoPE's cos and sin tables in as few ops as the arithmetic allows.

The engine asks for RoPE tables of a few positions (DART's key rotation, `compact` levels). The
rotary embedding of transformers' 1-D RoPE models (the Llama form: ``freqs = positions * inv_freq``,
``emb = cat(freqs, freqs)``, ``cos = emb.cos() * attention_scaling``, the same for sin, cast to the
caller's dtype) issues eleven torch ops, a launch each on a GPU, several of which do nothing here
(a float32 ``inv_freq`` cast to float32, a product by a scaling of 1, a cast to float32). This computes
the same values with the ops that do something: five for float32 tables and a scaling of 1, the
positions converted by the product's type promotion (the same float32 values). Taken only for a
module of that form whose ``inv_freq`` the forward does not update (not the dynamic or longrope
types); anything else (M-RoPE, a user's module) is called as is.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["is_plain_rope", "rope_tables"]


def is_plain_rope(rotary: nn.Module) -> bool:
    """Whether `rotary` has the form of transformers' 1-D rotary embedding with fixed frequencies."""
    inv_freq, rope_type = getattr(rotary, "inv_freq", None), getattr(rotary, "rope_type", None)
    return (
        type(rotary).__name__.endswith("RotaryEmbedding")
        and isinstance(inv_freq, torch.Tensor) and inv_freq.dim() == 1 and inv_freq.dtype == torch.float32
        and isinstance(getattr(rotary, "attention_scaling", None), (int, float))
        and isinstance(rope_type, str) and "dynamic" not in rope_type and rope_type != "longrope"
    )


def rope_tables(rotary: nn.Module, like: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [B, L, d] of a 1-D RoPE at integer `positions` [B, L], in `like`'s dtype and device:
    `rotary(like, positions)`'s values, in fewer ops when `is_plain_rope(rotary)`."""
    if not is_plain_rope(rotary) or positions.dim() != 2 or positions.is_floating_point():
        return rotary(like, positions)
    inv_freq = rotary.inv_freq if rotary.inv_freq.device == like.device else rotary.inv_freq.to(like.device)
    freqs = positions.unsqueeze(-1) * inv_freq  # [B, L, d/2] float32: the integers promoted, then one product
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    scaling = rotary.attention_scaling
    if scaling != 1.0:
        cos, sin = cos * scaling, sin * scaling
    if like.dtype != torch.float32:
        cos, sin = cos.to(like.dtype), sin.to(like.dtype)
    return cos, sin
