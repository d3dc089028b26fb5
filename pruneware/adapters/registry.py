"""Adapters by `config.model_type`; duplicates are rejected, unknown models get the list."""

from __future__ import annotations

from torch import nn

from pruneware.adapters.base import Adapter

_ADAPTERS: dict[str, type[Adapter]] = {}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    for model_type in cls.model_types:
        if model_type in _ADAPTERS:
            raise ValueError(f"model type {model_type!r} already has adapter {_ADAPTERS[model_type].__name__}")
        _ADAPTERS[model_type] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def unsupported_config(config) -> str | None:
    """None when a model of `config` has an adapter; else why not, naming the supported types."""
    model_type = getattr(config, "model_type", None)
    if model_type in _ADAPTERS:
        return None
    return f"has model_type {model_type!r}; pruneware supports {', '.join(supported_model_types())}"


def adapter_class(config) -> type[Adapter]:
    """The adapter class for a model of `config`, or a TypeError naming the supported types."""
    reason = unsupported_config(config)
    if reason is not None:
        raise TypeError(f"the model {reason}")
    return _ADAPTERS[config.model_type]


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for `model`, or a TypeError naming the supported model types."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = _ADAPTERS.get(model_type) if isinstance(model_type, str) else None
    if cls is None or not hasattr(model, "model") or not hasattr(model.model, "language_model"):
        raise TypeError(
            f"pruneware does not support {type(model).__name__} (model_type={model_type!r}); "
            f"supported model types: {', '.join(supported_model_types())} "
            "(pass the *ForConditionalGeneration model)"
        )
    return cls(model)
