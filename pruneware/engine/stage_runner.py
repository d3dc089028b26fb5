"""Running one stage's policy on a level: build its input (see stage_inputs.py), call the
policy as its declaration says (select, merge or recycle), report; and, in the language model,
opening the level the stage leaves."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pruneware.engine.levels import Level, next_level, write_visual
from pruneware.engine.request import RequestState
from pruneware.engine.run_tables import run_slots, run_starts
from pruneware.engine.stage_inputs import StageContext, no_grad, stage_input, visual_picker
from pruneware.kernels.gather import gather_rows
from pruneware.kernels.host import as_tensor
from pruneware.plans.plan import Stage
from pruneware.policies import MergeResult
from pruneware.report import StageReport


@dataclass
class Selection:
    """A stage's outcome: per sample, indices into the level's visual slots (in slot order)."""

    keep: list[torch.Tensor]
    merged: MergeResult | None
    report: StageReport
    finite: torch.Tensor | None = None  # [B] bool: the states the policy read are finite (read at the report's sync)
    visual_slots: torch.Tensor | None = None  # [B, k] the level's slots of the kept visual tokens, when made


def run_stage(ctx: StageContext) -> Selection:
    """Apply `ctx.policy` to the visual slots of `ctx.level` (see `StageContext`)."""
    policy, stage, level = ctx.policy, ctx.stage, ctx.level
    host_counts = level.n_visual  # host-side: no sync
    per_sample = ctx.sample_stages or [stage] * len(ctx.n_visual)
    budgets = [min(s.keep_count(nv, now), now) for s, nv, now in zip(per_sample, ctx.n_visual, host_counts, strict=True)]
    pick = visual_picker(level)
    inputs = stage_input(ctx, pick)
    finite = torch.isfinite(inputs.hidden).all(dim=(1, 2)) if policy.needs.states else None  # [B], no sync here
    merged = None
    if policy.needs.merges:
        merged = policy.merge(inputs, budgets)
        keep = merged.keep
    elif policy.needs.recycles:
        with no_grad():
            merged = policy.merge(inputs, budgets)
        keep = merged.keep
    else:
        with no_grad():
            keep = policy.select(inputs, budgets)
    slots = None
    if isinstance(keep, torch.Tensor):  # [B, k]: every sample keeps k
        keep = keep if keep.device == level.orig.device else keep.to(level.orig.device)
        # The level's slots of the kept tokens (next_level reuses them), made from what the host knows where it can.
        if level.visual_span is not None:  # visual slot j is slot start + j
            slots = keep + level.visual_span[0]
        elif level.visual_starts is not None:  # sample b's visual slot j is slot start_b + j
            slots = keep + run_starts(level.visual_starts, keep.device)
        elif level.is_root:  # the j-th visual slot is visual_first[:, j]
            slots = level.visual_first.gather(1, keep)
        if slots is None:
            kept = list(pick(level.orig).gather(1, keep))
        else:  # a root's slots are the input positions
            kept = list(slots if level.is_root else level.orig.gather(1, slots))
        counts = [keep.shape[1]] * keep.shape[0]
    else:
        originals = pick(level.orig)
        kept = [originals[b, k if k.device == originals.device else k.to(originals.device)] for b, k in enumerate(keep)]
        counts = [k.numel() for k in keep]
    report = StageReport(stage.where, stage.policy, kept, list(host_counts), counts)
    return Selection(keep, merged, report, finite, slots)


def enter_level(
    state: RequestState, stage: Stage, layer: int, selection: Selection, recycles: bool, hidden: torch.Tensor,
    args: tuple, kwargs: dict,
) -> tuple:
    """After an in-LLM stage at `layer`: open its level and give the layer the kept rows.

    hidden: [B, Ls, D] the layer's input (args[0], or kwargs["hidden_states"], which is
    replaced in place); recycles: the policy gives some kept slots new states. Returns the args.
    """
    level = next_level(state.levels[-1], selection.keep, selection.visual_slots)
    level.stage = stage
    if stage.positions == "compact":  # renumbered even where nothing was dropped, so a sample alone
        level.identity = False  # gets the positions it gets in a batch whose other samples drop tokens
    state.levels.append(level)
    state.starts.append(layer)
    recycled = selection.merged is not None and recycles
    if level.same_as_prev and not recycled:
        return args
    if not level.same_as_prev:
        hidden = _gather_with_rope(level, state.levels[-2], hidden, kwargs, state.prefill.lm_positions[0] is None)
    if recycled:
        hidden = _write_recycled(level, hidden, selection.merged.embeds)
    if args:
        return (hidden, *args[1:])
    kwargs["hidden_states"] = hidden
    return args


def _write_recycled(level: Level, hidden: torch.Tensor, embeds: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """hidden [B, Ls, D] with each sample's visual slots (in slot order) set to its states from a
    recycling policy, embeds [B, k, D] or per sample [k_b, D]: the values `write_visual` writes,
    in one op when the slots are known on the host (every sample's k visual slots one run:
    `Level.visual_span`, a `slice_scatter`; or a run of its own, `Level.visual_starts`, one
    `index_put` at host-built slots), else by `write_visual`."""
    span, starts = level.visual_span, level.visual_starts
    if isinstance(embeds, torch.Tensor) and level.n_visual and set(level.n_visual) == {embeds.shape[1]}:
        values = embeds if embeds.dtype == hidden.dtype else embeds.to(hidden.dtype)
        if span is not None:
            return hidden.slice_scatter(values, dim=1, start=span[0], end=span[0] + span[1])
        if starts is not None:
            samples = as_tensor(np.arange(len(starts))[:, None])  # [B, 1]
            samples = samples if hidden.device.type == "cpu" else samples.to(hidden.device)
            return hidden.index_put((samples, run_slots(starts, embeds.shape[1], hidden.device)), values)
    return write_visual(level, hidden, embeds)


def _gather_with_rope(
    level: Level, parent: Level, hidden: torch.Tensor, kwargs: dict, default_positions: bool,
) -> torch.Tensor:
    """hidden [B, Ls_prev, D] -> [B, Ls, D], the level's rows, gathered in one call (one launch
    on CUDA) with the layer's RoPE rows (cos, sin, position ids) when those are gathered by the
    same index: from level 0's when the level is cut from it, else from the parent's own rows
    (a gather of a gather: the same values). Positions kept only. The rows are left in
    `level.cache["rope_rows"]` for `layer_inputs.level_kwargs`, keyed by the level-0 tensors.
    default_positions: the language model numbered its input itself (no position ids given at
    prefill: 0..L0-1), so the kept position ids are the level's `index0`, not gathered."""
    cos_sin, positions = kwargs.get("position_embeddings"), kwargs.get("position_ids")
    source = None
    if cos_sin is not None and level.stage.positions != "compact":
        if level.index_prev is level.index0:
            source = (*cos_sin, positions)
        else:
            rows = parent.cache.get("rope_rows")
            if rows is not None and rows[0][0] is cos_sin[0] and rows[0][1] is cos_sin[1] and rows[1] is positions:
                source = (*rows[2], rows[3])
    if source is None:
        return gather_rows(level.index_prev, hidden)[0]
    if default_positions and positions is not None and positions.dim() == 2:  # [1|B, L0]: 0..L0-1 in every row
        hidden, cos, sin = gather_rows(level.index_prev, hidden, *source[:2])
        kept_positions = [level.index0]
    else:
        hidden, cos, sin, *kept_positions = gather_rows(level.index_prev, hidden, *source[:2], positions=source[2])
    level.cache["rope_rows"] = (cos_sin, positions, (cos, sin), kept_positions[0] if kept_positions else None)
    return hidden
