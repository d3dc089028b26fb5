"""Post-RoPE keys as a sample alone would have them, for scores that read keys' absolute values.

Attention is invariant to shifting every position of a sample by the same amount; a key's L1
norm is not (DART's pivots, `Needs(captures="key-norm")`): RoPE rotates each pair of channels by
an angle that grows with the position. In a left-padded batch a sample's tokens can sit further
along than alone: a plain forward of a 1-D RoPE model numbers the padding too (positions
0..L-1), and a `compact` stage numbers a level's slots, padding slots included. Alone, a
sample's first real token has position 0 (a plain forward, `generate`, Qwen's M-RoPE index).

So each sample's keys are rotated back by the position of its first real token: exactly what
the sample computes alone, whatever the padding. A sample whose first real token is at 0
(unpadded input, `generate`'s positions, Qwen) is rotated by zero, which leaves it unchanged.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from pruneware.engine.levels import Level
from pruneware.kernels.dart import rotate_back

if TYPE_CHECKING:
    from pruneware.engine.request import RequestState


def first_real_positions(positions: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B] the position of each sample's first real token at the language model's input, or None
    when nothing is padded (no mask). positions: [B, L], [3|4, B, L] or None (the model's
    default, 0..L-1); mask: [B, L] 2-D padding mask (1 = real)."""
    if mask is None:
        return None
    first = mask.long().argmax(dim=1)  # [B]: the first real column
    if positions is None:
        return first
    rows = positions if positions.dim() == 2 else positions[0]  # text rows: every M-RoPE row agrees
    return rows.gather(1, first[:, None]).squeeze(1)


def first_real_shift(state: RequestState, level: Level) -> torch.Tensor | None:
    """[B] how far each sample's positions at `level` sit beyond its positions alone (None: zero).

    A `compact` level numbers its slots 0..Ls-1; any other level has the language model's input
    positions (a `keep` stage takes the original ones, also after a `compact` stage)."""
    if level.stage is not None and level.stage.positions == "compact" and level is not state.levels[0]:
        return state.real_tokens(level).long().argmax(dim=1)  # [B] the level's first real slot
    positions, mask = state.prefill.lm_positions
    host = host_first_real(state)
    if host is not None and positions is None and mask is not None:  # positions 0..L-1: the first real column
        if not any(host):
            return None  # unpadded: rotated by zero
        shift = torch.frombuffer(array("q", host), dtype=torch.int64)  # no op on the CPU
        return shift if mask.device.type == "cpu" else shift.to(mask.device)
    return first_real_positions(positions, mask)


def host_first_real(state: RequestState) -> list[int] | None:
    """Each sample's first real column at the language model's input, known on the host from the
    layout (`VisualLayout.first_real`) when that input is the model's own (no `pre` or
    vision-side stage shortened it); None otherwise."""
    plan = state.plan
    if plan.vision or (plan.stages and plan.stages[0].where == "pre"):
        return None
    return state.prefill.layout.first_real


def keys_as_alone(
    key: torch.Tensor, shift: torch.Tensor | None, rotary: Callable[[torch.Tensor, torch.Tensor], tuple],
) -> torch.Tensor:
    """key: [B, Hkv, Ls, d] post-RoPE; shift: [B] positions to rotate back (None: none).
    rotary(like, positions [B, 2]) -> (cos, sin) [B, 2, d]: the model's RoPE tables, taken in one
    call at each shift and at 0 (whose cos is a RoPE's attention scaling, 1 for most); the
    rotation is one kernel call (`kernels.dart.rotate_back`: transformers' rotation by -shift)."""
    if shift is None:
        return key
    positions = torch.stack([shift, torch.zeros_like(shift)], dim=1)  # [B, 2]
    like = key if key.dtype == torch.float32 else key.new_zeros(1, dtype=torch.float32)  # float32 tables
    cos, sin = rotary(like, positions)
    return rotate_back(key, cos, sin)
