"""Which KV caches the engine can drive, checked before a prefill runs any layer.

Pruning gives the layers of a level fewer cached tokens than level 0. Two caches allow that:
  - DynamicCache (the default): each layer's cache grows to its own length;
  - StaticCache (`cache_implementation="static"`, what compiled decoding uses): every layer
    has a buffer of `max_cache_len` slots and its own fill count, so a level fills its first
    Ls + steps slots and the engine maps the mask's columns onto them (see masks.py).
Offloaded, quantized, sliding-window and hybrid caches are refused with an error naming them.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer, StaticLayer

SUPPORTED = "DynamicCache (the default) and StaticCache (cache_implementation='static')"


def cache_of(kwargs: dict[str, Any]) -> Any:
    """The cache in a forward's kwargs: transformers 5.24 calls it `cache`, 5.4-5.23 `past_key_values`."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


def output_cache(output: Any) -> Any:
    """The cache a forward returned (`cache` in 5.24, `past_key_values` before), or None."""
    found = getattr(output, "cache", None)
    return found if found is not None else getattr(output, "past_key_values", None)


def static_length(cache: Any) -> int | None:
    """None for a dynamic cache (or none), `max_cache_len` for a static one.

    Raises:
        ValueError: a cache the engine cannot drive, naming it and the supported ones.
    """
    if cache is None:
        return None
    layers = list(getattr(cache, "layers", None) or [])
    lazy = getattr(cache, "layer_class_to_replicate", None)
    kinds = {type(layer) for layer in layers} | ({lazy} if lazy is not None else set())
    name = type(cache).__name__
    if getattr(cache, "offloading", False):
        raise ValueError(f"pruneware cannot prune with an offloaded {name}; supported caches: {SUPPORTED}")
    if kinds == {DynamicLayer}:
        return None
    if kinds == {StaticLayer}:
        return int(layers[0].max_cache_len)
    found = ", ".join(sorted(k.__name__ for k in kinds)) or "no layers"
    raise ValueError(
        f"pruneware cannot prune with a {name} whose layers are {found} (e.g. quantized, sliding-window or "
        f"hybrid); supported caches: {SUPPORTED}"
    )


def unwrap_mask(mask: Any) -> Any:
    """generate() prebuilds a static cache's masks, per attention type for some models (Qwen)."""
    if isinstance(mask, dict):
        if set(mask) != {"full_attention"}:
            raise ValueError(f"pruneware supports full-attention layers only; this model has masks for {sorted(mask)}")
        return mask["full_attention"]
    return mask


def padding_of(mask: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """[B, L] long padding mask of a prebuilt 4-D causal mask [B|1, 1, L, K]: the last query
    row (the last real token of a left-padded row) attends to exactly the real keys."""
    last = mask[:, 0, -1, :length]
    keep = last if last.dtype == torch.bool else last == 0
    return keep.long().expand(batch, length)
