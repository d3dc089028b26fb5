"""What the decoder layers of a pruned level receive instead of the model loop's full-size kwargs.

The model loop builds the mask and the cos/sin tables once per forward for the level-0
sequence; every layer of a pruned level needs the rows and columns of its kept slots (or, with
`compact` positions, tables recomputed for re-indexed positions).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from pruneware.engine import masks
from pruneware.engine.levels import Level
from pruneware.kernels.gather import gather_rows

if TYPE_CHECKING:
    from pruneware.engine.request import RequestState


def memoised_level_kwargs(
    state: RequestState, level: Level, group: Any, kwargs: dict[str, Any], rotary: Callable, kind: masks.MaskKind,
) -> dict[str, Any]:
    """`level_kwargs` for a layer of `group` (layers of a group share mask and RoPE), computed
    once per level per forward."""
    key = ("kwargs", group)
    if key not in level.cache:
        decode = state.decode
        level.cache[key] = level_kwargs(
            level, kwargs, kind=kind, compact=level.stage.positions == "compact", rotary=rotary,
            decoding=decode.active, level0_length=state.levels[0].length, past0=decode.past0,
            q_length=decode.q_length, static_len=state.static_len,
            default_positions=state.prefill.lm_positions[0] is None,
        )
    return level.cache[key]  # type: ignore[return-value]


def level_kwargs(
    level: Level, kwargs: dict[str, Any], *, kind: masks.MaskKind, compact: bool, rotary: Callable,
    decoding: bool, level0_length: int, past0: int, q_length: int, static_len: int | None = None,
    default_positions: bool = False,
) -> dict[str, Any]:
    """The kwargs to replace at a layer of `level`.

    kwargs: the layer's own (level-0 sized) kwargs: `position_embeddings` (cos, sin) [B|1, Q, d],
    `attention_mask` (see masks.py), `position_ids`. At decode, past0 is the level-0 cache length
    before the step and q_length the step's new tokens. rotary(like, positions) -> (cos, sin):
    the adapter's RoPE tables (`Adapter.rope_tables`), for `compact` positions. static_len: a static cache's
    `max_cache_len` (every layer then attends over that many key slots), None for a dynamic one.
    default_positions: the language model numbered its prefill input itself (0..L0-1, no position
    ids given), so a level's kept position ids are its `index0` (no gather).
    """
    cos, sin = kwargs["position_embeddings"]
    out: dict[str, Any] = {}
    index0, valid = level.index0, level.valid
    if decoding:
        kv = past0 + q_length
        out["attention_mask"] = masks.slice_decode_mask(
            kwargs.get("attention_mask"), index0, valid, level0_length, kv, q_length, kind, cos.dtype, width=static_len,
            all_valid=level.all_valid,
        )
        if compact:
            start = level.length + past0 - level0_length
            new_pos = torch.arange(start, start + q_length, device=cos.device).expand(index0.shape[0], -1)
            out["position_embeddings"] = rotary(cos, new_pos)
            out["position_ids"] = new_pos
        return out
    if static_len is None:
        out["attention_mask"] = masks.slice_prefill_mask(
            kwargs.get("attention_mask"), index0, valid, kind, cos.dtype, all_valid=level.all_valid
        )
    else:
        out["attention_mask"] = masks.slice_static_prefill_mask(
            kwargs.get("attention_mask"), index0, valid, level0_length, static_len, kind, cos.dtype, all_valid=level.all_valid
        )
    if compact:
        new_pos = torch.arange(level.length, device=cos.device).expand(index0.shape[0], -1)
        out["position_embeddings"] = rotary(cos, new_pos)
        out["position_ids"] = new_pos
    else:
        pos = kwargs.get("position_ids")
        rows = level.cache.get("rope_rows")  # gathered with the hidden states (stage_runner.enter_level)
        if rows is not None and rows[0][0] is cos and rows[0][1] is sin and rows[1] is pos:  # type: ignore[index]
            gathered = (*rows[2], rows[3])  # type: ignore[index]
        else:
            if default_positions and pos is not None and pos.dim() == 2:  # 0..L0-1: the kept ones are index0
                gathered = (*gather_rows(index0, cos, sin), index0)
            else:
                gathered = gather_rows(index0, cos, sin, positions=pos)  # one fused launch on CUDA
            level.cache["rope_rows"] = ((cos, sin), pos, gathered[:2], gathered[2] if pos is not None else None)
        out["position_embeddings"] = gathered[:2]
        if pos is not None:
            out["position_ids"] = gathered[2]
    return out
