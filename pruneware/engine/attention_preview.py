"""Previewing a decoder layer's attention on its unpruned input (PyramidDrop's ranking).

A policy with `Needs(attention="own")` ranks tokens by the attention layer K itself would
compute, before the stage at K prunes its input. The session calls layer K's attention module
on the level's states (through the layer's input norm, with the layer's mask and RoPE, without
the cache); the registered capture (see attention_capture.py) scores the query rows from q and k and
raises `PreviewDone`, so the attention product, the output projection and any cache update
never run. The model's own projections, norms and RoPE produce q and k, for every family.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_NOT_FOR_PREVIEW = ("cache", "past_key_values", "past_key_value", "use_cache", "output_attentions", "hidden_states")


class PreviewDone(Exception):
    """Raised by the capture once a preview has its q and k: the preview needs no attention output."""


def run_preview(layer: nn.Module, hidden: torch.Tensor, layer_kwargs: dict[str, Any]) -> None:
    """Run `layer`'s input norm and attention on hidden [B, Ls, D] until the capture stops it.

    layer_kwargs: the keyword arguments the layer receives for this level (mask, RoPE, ...).
    """
    attn_kwargs = {k: v for k, v in layer_kwargs.items() if k not in _NOT_FOR_PREVIEW}
    try:
        with torch.no_grad():
            layer.self_attn(hidden_states=layer.input_layernorm(hidden), **attn_kwargs)
    except PreviewDone:
        pass
