"""Row gather with a per-sample keep index, plain torch: the truth the Triton kernel is tested against.

When a stage drops tokens, every tensor laid out along the sequence loses the same rows:
the hidden states, the rotary cos/sin tables, the position ids, a 2-D mask. For each
sample ``b`` and kept slot ``j``::

    out[..., b, j, :] = x[..., b or 0, index[b, j], :]

Layouts (the sequence dim is found from the argument, never from sizes):

* ``tensors``: ``[B, L, W]`` or ``[1, L, W]`` rows of width ``W`` (hidden states, cos, sin;
  a batch-1 table is broadcast to every sample), or ``[B, L]`` / ``[1, L]`` (one value per
  token, e.g. a 2-D attention mask or 1-D position ids). Gathered along dim 1.
* ``positions``: position ids ``[B, L]`` or M-RoPE ``[G, B, L]`` (``G`` = 3, or 4 with the
  text positions first); batch-1 planes broadcast too. Gathered along the last dim.

Every output is a new contiguous tensor with the input's dtype and the index's batch size.
"""

from __future__ import annotations

from functools import lru_cache

import torch

_NAME = "gather_rows"


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def validate_inputs(
    index: torch.Tensor, tensors: tuple[torch.Tensor, ...], positions: torch.Tensor | None
) -> int:
    """Check shapes, dtypes and devices; return the shared sequence length L.

    Raises ValueError naming the bad argument, its shape and what is expected. Shared by
    both backends so they reject the same inputs. Index *values* are not checked here:
    that would need a device sync on every call.
    """
    if index.dim() != 2 or index.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"{_NAME}: index must be an integer tensor (int64 or int32) [B, k] of kept positions, "
            f"got {index.dtype} of shape {_shape(index)}"
        )
    if not tensors and positions is None:
        raise ValueError(f"{_NAME}: nothing to gather; pass at least one tensor or positions=")
    B = index.shape[0]
    named = [(f"tensors[{i}]", t) for i, t in enumerate(tensors)]
    if positions is not None:
        named.append(("positions", positions))
    length: int | None = None
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{_NAME}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != index.device:
            raise ValueError(f"{_NAME}: {name} is on {t.device} but index is on {index.device}")
        if t.dtype.is_complex:  # a dtype attribute: no torch call on the hot path
            raise ValueError(f"{_NAME}: {name} has complex dtype {t.dtype}; real, integer or bool only")
        if name == "positions":
            ok = t.dim() == 2 or (t.dim() == 3 and t.shape[0] in (3, 4))
            want = "[B, L] or M-RoPE [3, B, L] / [4, B, L]"
            batch, seq = t.shape[-2] if t.dim() >= 2 else None, t.shape[-1] if t.dim() else None
        else:
            ok = t.dim() in (2, 3)
            want = "[B, L, W], [1, L, W], [B, L] or [1, L]"
            batch, seq = (t.shape[0], t.shape[1]) if ok else (None, None)
        if not ok or batch not in (1, B):
            raise ValueError(
                f"{_NAME}: {name} must be {want} with B={B} (the index's batch) or 1, "
                f"got shape {_shape(t)}"
            )
        if length is None:
            length = seq
        elif seq != length:
            raise ValueError(
                f"{_NAME}: every tensor must share the sequence length L={length}, "
                f"but {name} has L={seq} (shape {_shape(t)})"
            )
    assert length is not None
    if length == 0 and index.numel() > 0:
        raise ValueError(f"{_NAME}: cannot keep {index.shape[1]} positions of an empty sequence (L=0)")
    return length


@lru_cache(maxsize=32)
def _batch_rows(batch: int, device: torch.device, inference: bool) -> torch.Tensor:
    """[B, 1] long 0..B-1: the sample index that pairs with a [B, k] keep index in one advanced
    index (made once per size, device and inference mode, never written)."""
    return torch.arange(batch, device=device)[:, None]


def _gather_seq(x: torch.Tensor, index: torch.Tensor, dim: int, cache: dict) -> torch.Tensor:
    """x [..., Bx, L, *W] with Bx in {1, B} at dim-1; index [B, k] int64 -> [..., B, k, *W].

    Batch 1 (one sample): a single `index_select` of the k rows, much faster on the CPU than a
    gather over an expanded index. Several samples: one advanced index `x[..., rows, index]`
    (rows: [B, 1] the sample of each row, or [1, 1] zeros for a batch-1 table, broadcast), which
    needs no view of the index (a `take_along_dim` would need one per layout: each op is a
    dispatch on the host) and runs several times faster on the CPU.
    cache: per call, the index forms made once and shared by its tensors.
    """
    B = index.shape[0]
    if B == 1 and x.shape[dim - 1] == 1:
        if "row" not in cache:
            cache["row"] = index[0]
        return x.index_select(dim, cache["row"])  # [..., 1, k, *W]
    rows = _batch_rows(B if x.shape[dim - 1] == B else 1,  # a batch-1 table: sample 0 for every row
                       index.device, torch.is_inference_mode_enabled())
    if dim == 1:
        return x[rows, index]  # a new contiguous tensor
    return x[(slice(None),) * (dim - 1) + (rows, index)]
def gather_rows(
    index: torch.Tensor, *tensors: torch.Tensor, positions: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """Keep rows ``index[b]`` of every tensor, sample by sample.

    Args:
        index: ``[B, k]`` int64 (or int32) positions in ``[0, L)`` to keep, per sample.
        tensors: each ``[B, L, W]`` / ``[1, L, W]`` or ``[B, L]`` / ``[1, L]``.
        positions: position ids ``[B, L]`` or ``[G, B, L]`` (M-RoPE), batch 1 allowed.

    Returns:
        One tensor per input, in order, ``positions`` last: ``[B, k, W]`` / ``[B, k]`` /
        ``[G, B, k]``, same dtype and device, contiguous.
    """
    validate_inputs(index, tensors, positions)
    index = index if index.dtype == torch.int64 else index.long()
    cache: dict = {}
    out = [_gather_seq(t, index, 1, cache) for t in tensors]
    if positions is not None:
        out.append(_gather_seq(positions, index, positions.dim() - 1, cache))
    return tuple(out)
