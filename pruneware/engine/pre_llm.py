"""A `pre` stage: prune (or merge) at the input of the language model, so every layer and the
KV cache see the shorter sequence; and the decode-time remapping that goes with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from pruneware.adapters import Adapter
from pruneware.engine import masks
from pruneware.engine.kv_caches import padding_of
from pruneware.engine.levels import Level, as_root, next_level, root_level
from pruneware.engine.request import RequestState
from pruneware.engine.stage_runner import Selection
from pruneware.engine.vit_units import vision_reports
from pruneware.kernels.gather import gather_rows
from pruneware.plans.plan import Stage


@dataclass
class PrePruned:
    """The language model's new inputs after a `pre` stage.

    Attributes:
        embeds: [B, L0, D]; mask: [B, L0] 2-D padding mask (invalid slots are 0);
        positions: the new position ids, same layout as the model's ([B, L0] or [3|4, B, L0]);
        rewritten: True when positions no longer follow the original ones (compact, or
            merged tokens on an M-RoPE model), so decode positions must be recomputed.
    """

    embeds: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    rewritten: bool


def prune_inputs(
    adapter: Adapter, stage: Stage, level: Level, selection: Selection, embeds: torch.Tensor,
    mask: torch.Tensor | None, positions: torch.Tensor | None, position_inputs: dict,
) -> PrePruned:
    """Apply a `pre` stage. level: the pruned level (index_prev into the input sequence);
    position_inputs: what the adapter keeps for `merged_positions` (see `Adapter.position_inputs`)."""
    batch, length = embeds.shape[:2]
    device = embeds.device
    index = level.index_prev
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.long, device=device)
    if positions is None and adapter.rope != "mrope":
        # The model's default positions are 0..L-1, so the kept ones are the keep index itself.
        new_embeds, new_mask = gather_rows(index, embeds, mask)
        kept_positions = index
        positions = index  # only its shape is read below
    else:
        if positions is None:
            positions = torch.arange(length, device=device).expand(3, batch, length)
        # One fused launch (on CUDA) for every row tensor that shares the keep index.
        new_embeds, new_mask, kept_positions = gather_rows(index, embeds, mask, positions=positions)
    if not level.all_valid:
        new_mask = new_mask * level.valid.to(new_mask.dtype)
    if selection.merged is not None:
        merged_embeds = selection.merged.embeds
        if isinstance(merged_embeds, torch.Tensor) and level.visual_span is not None:  # [B, k, D] into one run
            start, k = level.visual_span
            same = merged_embeds.dtype == new_embeds.dtype
            new_embeds[:, start : start + k] = merged_embeds if same else merged_embeds.to(new_embeds.dtype)
        elif isinstance(merged_embeds, torch.Tensor):  # [B, k, D]: each sample's k visual slots, in one scatter
            slots = level.visual_first[:, : merged_embeds.shape[1], None].expand(-1, -1, merged_embeds.shape[2])
            same = merged_embeds.dtype == new_embeds.dtype
            new_embeds.scatter_(1, slots, merged_embeds if same else merged_embeds.to(new_embeds.dtype))
        else:
            for b, merged in enumerate(merged_embeds):
                slots = level.visual[b].nonzero().squeeze(1)
                new_embeds[b, slots] = merged.to(new_embeds.dtype)
    rewritten = True
    if stage.positions == "compact":
        new_positions = torch.arange(level.length, device=device).expand(*positions.shape[:-1], -1)
    elif selection.merged is not None and selection.merged.grids is not None and adapter.rope == "mrope":
        grid = adapter.merged_positions(position_inputs, index, level.valid, selection.merged.grids, new_mask)  # [3, B, L0]
        new_positions = grid if positions.shape[0] == 3 else torch.cat([_text_positions(new_mask)[None], grid])
    else:
        new_positions = kept_positions
        rewritten = False
    return PrePruned(new_embeds, new_mask, new_positions, rewritten)


def _text_positions(mask: torch.Tensor) -> torch.Tensor:
    """[B, L] 1-D positions of a left-padded batch, as generate() builds them."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def remap_decode(
    level0: Level, input_length: int, past0: int, q: int, mask: torch.Tensor | None,
    positions: torch.Tensor | None, last_position: torch.Tensor, rewritten: bool, compact: bool,
) -> dict:
    """Kwargs to replace at a decode step after a `pre` stage.

    mask: the full-length 2-D mask [B, input_length + steps] (or, under a static cache, a 4-D
    [B, 1, q, max_cache_len] mask already over the pruned slots); past0: the pruned cache length
    before this step; last_position: [..., B] position of the last prefill token.
    """
    out: dict = {}
    batch = level0.index_prev.shape[0]
    device = level0.index_prev.device
    if mask is not None and mask.dim() == 4:  # a static cache's mask, already over the pruned slots
        out["attention_mask"] = mask
    elif mask is not None:
        head = mask[:, :input_length].gather(1, level0.index_prev) * level0.valid.to(mask.dtype)
        out["attention_mask"] = torch.cat([head, mask[:, input_length:]], dim=1)
    elif not level0.all_valid:
        ones = torch.ones(batch, past0 - level0.length + q, dtype=torch.long, device=device)
        out["attention_mask"] = torch.cat([level0.valid.long(), ones], dim=1)
    steps = torch.arange(q, device=device) + (past0 - level0.length)
    if compact:
        out["position_ids"] = (level0.length + steps).expand(batch, q)
    elif positions is None or rewritten:
        out["position_ids"] = last_position[..., None] + 1 + steps
    return out


def decode_inputs(
    state: RequestState, kwargs: dict, embeds: torch.Tensor, positions: torch.Tensor | None,
    mask: torch.Tensor | None, kind: masks.MaskKind,
) -> dict:
    """The language model's kwargs at a decode step of a sequence whose prefill ran a `pre` stage.

    embeds: [B, q, D] the step's new tokens; mask: as generate() passes it (see `remap_decode`).
    """
    decode = state.decode
    decode.q_length = embeds.shape[1]
    pre = state.plan.stages[0] if state.plan.stages and state.plan.stages[0].where == "pre" else None
    pre = decode.folded or pre  # a stage at layer 0, folded into level 0, acts as a `pre` stage here
    if pre is None and not state.plan.vision:  # level 0 is the input itself
        return kwargs
    if mask is not None and mask.dim() == 4:
        # generate() built this static-cache mask from input-length padding but pruned cache
        # positions; rebuild it from the pruned padding instead.
        level0 = state.levels[0]
        mask = masks.slice_decode_mask(
            None, level0.index0, state.padding0, level0.length, decode.past0 + decode.q_length, decode.q_length,
            kind, mask.dtype if mask.is_floating_point() else embeds.dtype, width=mask.shape[-1],
        )
    kwargs.update(remap_decode(
        state.levels[0], decode.input_length, decode.past0, decode.q_length, mask, positions,
        decode.last_position, decode.rewritten, pre is not None and pre.positions == "compact",
    ))
    return kwargs


def prefill_inputs(
    state: RequestState, adapter: Adapter, kwargs: dict, embeds: torch.Tensor, positions: torch.Tensor | None,
    mask: torch.Tensor | None, kind: masks.MaskKind, records_lm_input: bool,
    run_pre: Callable[[Stage, Level, torch.Tensor], Selection],
    vision_keep: Callable[[torch.Tensor, list[int]], list[list[torch.Tensor]]] | None = None,
) -> dict:
    """The language model's kwargs at prefill: level 0 set up, and the `pre` stage run if the plan has one.

    embeds: [B, L, D] its input; mask: the unwrapped mask generate() passed (2-D, or 4-D for a
    static cache); records_lm_input: keep the (pruned) input for policies that rate text;
    run_pre(stage, level, hidden): the `pre` stage's selection on a level (the root, or what a
    vision-side stage left) whose states are hidden [B, Ls, D];
    vision_keep(visual [B, L] bool, n_visual per sample on the host): per vision-side stage, per sample,
    the visual slots it kept;
    the last stage's enter as a `pre` stage keeping them would (None: the plan has no vision-side stage).
    """
    prefill, decode = state.prefill, state.decode
    decode.input_length = decode.q_length = embeds.shape[1]
    prefill.injections = adapter.take_injections(kwargs)
    layout = prefill.layout
    image_ids = layout.image_ids if layout.image_ids.device == embeds.device else layout.image_ids.to(embeds.device)
    root = root_level(image_ids, prefill.n_visual, layout.sizes, layout.visual_span, layout.spans)
    pre = state.plan.stages[0] if state.plan.stages and state.plan.stages[0].where == "pre" else None
    full = None  # a 4-D mask generate() prebuilt for a static cache
    if mask is not None and mask.dim() == 4 and state.static_len is not None:
        full, mask = mask, padding_of(mask, embeds.shape[0], embeds.shape[1])
    elif mask is not None and mask.dim() != 2:
        raise ValueError("pruneware needs a 2-D attention_mask [batch, length] (or none) at the language model")
    # [B] real tokens, for the report: the layout's host copy when it read this mask (no op, no read at the end)
    prefill.input_real = None if mask is None else layout.real or torch.count_nonzero(mask, dim=1)
    if pre is None and vision_keep is None:
        decode.last_position = None if positions is None else positions[..., -1]  # for a stage at layer 0
        state.levels, state.starts = [root], [0]
        state.padding0 = None if mask is None else mask.bool()
        prefill.lm_positions = (positions, mask)
        prefill.lm_embeds = embeds if records_lm_input else None
        return kwargs
    base = root
    if vision_keep is not None:  # the slots the vision-side stages kept, as a `pre` stage would keep them
        kept_by_stage = vision_keep(root.visual, root.n_visual)  # one report each
        prefill.report.stages.extend(vision_reports(state.plan.vision, kept_by_stage, root, prefill.n_visual))
        vision_stage, kept = state.plan.vision[-1], kept_by_stage[-1]
        base = next_level(root, kept)
    if pre is None:
        selection = Selection(kept if isinstance(kept, torch.Tensor) else list(kept), None, prefill.report.stages[-1])
        level, pre = base, vision_stage
    else:
        hidden = embeds if base is root else gather_rows(base.index_prev, embeds)[0]
        selection = run_pre(pre, base, hidden)
        level = next_level(base, selection.keep, selection.visual_slots)  # slots made by the stage: not twice
        if base is not root:  # index the input sequence itself, as prune_inputs expects
            level = replace(level, index_prev=level.orig)
    pruned = prune_inputs(adapter, pre, level, selection, embeds, mask, positions, prefill.position_inputs)
    state.levels, state.starts = [as_root(level)], [0]
    state.padding0 = pruned.mask.bool()
    prefill.lm_positions = (pruned.positions, pruned.mask)
    prefill.lm_embeds = pruned.embeds if records_lm_input else None
    decode.last_position = pruned.positions[..., -1]
    decode.rewritten = pruned.rewritten
    new_mask = pruned.mask if full is None else masks.slice_static_prefill_mask(
        full, level.index_prev, level.valid, embeds.shape[1], state.static_len, kind, embeds.dtype
    )
    kwargs.update(inputs_embeds=pruned.embeds, attention_mask=new_mask, position_ids=pruned.positions)
    return kwargs
