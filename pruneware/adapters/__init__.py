"""Model-family adapters. A new family is one file here with a `@register_adapter` class."""

from pruneware.adapters import llava, qwen2_5_vl  # noqa: F401  (registration)
from pruneware.adapters.base import Adapter, VisualLayout
from pruneware.adapters.registry import adapter_for, register_adapter, supported_model_types

__all__ = ["Adapter", "VisualLayout", "adapter_for", "register_adapter", "supported_model_types"]
