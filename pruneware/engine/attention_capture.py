"""A registered attention function that lets a session see q and k, then runs the user's backend.

FastV-style code switches the whole model to eager attention to read attention weights, which
materialises every L x L matrix. pruneware instead registers, for the session's lifetime, an
attention function that wraps the backend the user chose (sdpa, flash_attention_2, eager, ...):
it hands the post-RoPE queries and the (cache-updated, not repeated) keys to the session, which
scores only the query rows it needs, and then calls the original backend unchanged.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from itertools import count
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

OnAttention = Callable[[nn.Module, torch.Tensor, torch.Tensor, Any], None]
_ids = count()


def original_function(name: str, module: nn.Module) -> Callable:
    """The attention function registered as `name` (the backend a capture wraps) for `module`."""
    if name != "eager":
        return AttentionInterface._global_mapping[name]  # checked in AttentionCapture.__init__
    # Eager attention lives in each modeling file, next to the attention module.
    return sys.modules[type(module).__module__].eager_attention_forward


class AttentionCapture:
    """Installs a wrapping attention implementation on a model's text config, and removes it."""

    sub_config = "text_config"  # the sub-model whose attention is wrapped

    def __init__(self, model: nn.Module, on_attention: OnAttention):
        self.model = model
        self.on_attention = on_attention
        text = self.sub_config == "text_config"
        config = model.config.get_text_config() if text else getattr(model.config, self.sub_config)
        self.original = config._attn_implementation or "eager"
        if self.original.startswith("flex"):
            raise ValueError(
                "pruneware cannot read attention rows under flex_attention; "
                "use sdpa, flash_attention_2 or eager for policies that need attention (e.g. fastv)"
            )
        if self.original != "eager" and self.original not in AttentionInterface._global_mapping:
            raise ValueError(
                f"pruneware cannot wrap the attention backend {self.original!r}: it is not registered in "
                f"transformers' AttentionInterface (registered: eager, {', '.join(sorted(AttentionInterface._global_mapping))})"
            )
        # Keep the backend's name inside ours: transformers checks e.g. "flash" in the name.
        self.name = f"pruneware{next(_ids)}_{self.original}"
        self._installed = False

    def _attention(self, module: nn.Module, query, key, value, attention_mask, **kwargs):
        if getattr(module, "layer_idx", None) is not None:
            self.on_attention(module, query, key, attention_mask)
        return original_function(self.original, module)(module, query, key, value, attention_mask, **kwargs)

    def install(self) -> None:
        mask_fn = AttentionMaskInterface._global_mapping.get(self.original)
        if mask_fn is None:
            mask_fn = AttentionMaskInterface._global_mapping["sdpa"]
        AttentionInterface.register(self.name, self._attention)
        AttentionMaskInterface.register(self.name, mask_fn)
        try:
            self.model.set_attn_implementation({self.sub_config: self.name})
        except Exception:
            self._unregister()
            raise
        self._installed = True

    def _unregister(self) -> None:
        AttentionInterface._global_mapping.pop(self.name, None)
        AttentionMaskInterface._global_mapping.pop(self.name, None)

    def remove(self) -> None:
        if self._installed:
            self.model.set_attn_implementation({self.sub_config: self.original})
            self._installed = False
        self._unregister()
