"""Model-family adapters. A new family is one file here with a `@register_adapter` class."""

from pruneware.adapters import llava, llava_next, qwen2_5_vl, qwen2_vl, qwen3_vl  # noqa: F401  (registration)
from pruneware.adapters.base import Adapter, VisualInjections, VisualItem, VisualLayout, items_to_layout
from pruneware.adapters.registry import adapter_class, adapter_for, register_adapter, supported_model_types

__all__ = [
    "Adapter", "VisualInjections", "VisualItem", "VisualLayout", "adapter_class", "adapter_for", "items_to_layout",
    "register_adapter", "supported_model_types",
]
