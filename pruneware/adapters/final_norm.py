"""The language model's final norm in one fused call where its arithmetic allows.

DART (`Needs(final_norm=True)`) scores the states entering a decoder layer after the language
model's final norm. The Llama-style RMSNorm of transformers (Llama, Mistral, Qwen2, Qwen2.5-VL
and Qwen3-VL text models: ``weight * (x32 * rsqrt(mean(x32 ** 2) + eps)).to(dtype)`` with
``x32 = x.float()``) is eight torch ops, each a launch on a GPU. ``torch.nn.functional.rms_norm``
runs the same float32 arithmetic in one (float32 states) or four (16-bit states: the widening,
the norm, the narrowing and the weight, in the module's order); on the CPU its numbers are the
module's bit for bit (tests/adapters/test_final_norm.py, float32, bfloat16 and float16). A CUDA
build may reduce the mean of squares in another order than the module's ``mean``: the last bit
can then differ, as between any two reductions.

A module is taken as that norm when it has the form transformers gives it (a class named
``...RMSNorm`` with a 1-D ``weight`` and a ``variance_epsilon``); any other norm (Gemma's
``1 + weight``, which names its epsilon ``eps``, a LayerNorm, a user's own) is called as is.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["final_norm", "is_llama_rms_norm"]


def is_llama_rms_norm(norm: nn.Module) -> bool:
    """Whether `norm` has the form of transformers' Llama-style RMSNorm (see the module docstring)."""
    weight = getattr(norm, "weight", None)
    return (
        type(norm).__name__.endswith("RMSNorm")
        and isinstance(getattr(norm, "variance_epsilon", None), float)
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 1
    )


def final_norm(norm: nn.Module, states: torch.Tensor) -> torch.Tensor:
    """`norm(states)` for states ``[..., D]``: one fused ``rms_norm`` for a Llama-style RMSNorm
    (same numbers, fewer ops), else the module's own forward."""
    if not is_llama_rms_norm(norm) or states.shape[-1] != norm.weight.shape[0]:
        return norm(states)
    weight, eps = norm.weight, norm.variance_epsilon
    shape = (states.shape[-1],)
    if states.dtype == torch.float32 and weight.dtype == torch.float32:
        return torch.nn.functional.rms_norm(states, shape, weight, eps)
    return weight * torch.nn.functional.rms_norm(states.float(), shape, None, eps).to(states.dtype)
