"""Trained CrossLMM adapters: modules, safetensors I/O, and distillation training."""

from pruneware.crosslmm.modules import AdapterError, V2VAdapter, live_adapter, load_adapter, save_adapter

__all__ = ["AdapterError", "V2VAdapter", "live_adapter", "load_adapter", "save_adapter"]
