"""Zero-copy exchange between CPU tensors and numpy arrays, for the kernels' numpy CPU paths.

``Tensor.numpy()`` dispatches four aliasing aten ops (detach, to, resolve_conj, resolve_neg)
and ``torch.from_numpy`` one (lift_fresh); none computes anything, but each is a torch call,
and the launch budget (``pruneware.engine.profiling``) counts every top-level aten op. DLPack
shares the same memory with no torch op at all, so a numpy path costs what its work costs.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["as_numpy", "as_tensor"]


def as_numpy(x: torch.Tensor, float32: bool = False) -> np.ndarray:
    """x (a CPU tensor) as a numpy array sharing its memory; float32=True widens a floating x to
    float32 first (a copy only when it is not float32 already; bfloat16 has no numpy dtype)."""
    if x.device.type != "cpu":
        raise ValueError(f"as_numpy takes CPU tensors, got {x.device}")
    if float32 and x.dtype != torch.float32:
        x = x.float()
    elif x.dtype == torch.bfloat16:
        raise ValueError("bfloat16 has no numpy dtype: pass float32=True")
    if x.requires_grad:
        x = x.detach()
    return np.from_dlpack(x)


def as_tensor(a: np.ndarray) -> torch.Tensor:
    """a (a numpy array) as a CPU tensor sharing its memory."""
    return torch.from_dlpack(np.ascontiguousarray(a))
