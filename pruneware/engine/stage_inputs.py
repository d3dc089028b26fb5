"""What a stage reads, built from its policy's `needs` declaration: the one place the engine
turns a declaration (see `pruneware.policies.needs`) into inputs.

  - capture: whether the attention a layer runs feeds the stage ahead (`needs.attention`), and
    what is scored from its q and k (`captures`, `query`, `query_block`, `raters`);
  - context: the captured scores, the vision tower's reads (`needs.vision`), the real-token
    mask and the final norm (`needs.final_norm`) that one stage runs with;
  - `StageInput`: the visual slots' states, validity and image ids, plus what was declared
    (attention, text rows, vision scores and keys).

No other engine module reads a policy's declaration beyond where it runs and what it returns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import TYPE_CHECKING

import numpy as np
import torch

from pruneware.engine.levels import Level, identity_tensors
from pruneware.engine.key_positions import first_real_shift, keys_as_alone
from pruneware.engine.run_tables import post_image_rows, run_slots, slot_run
from pruneware.engine.vision_tower_reads import reads_to_positions
from pruneware.errors import PlanError
from pruneware.kernels.dart import key_norms
from pruneware.kernels.gather import gather_rows
from pruneware.kernels.host import as_tensor
from pruneware.kernels.scores import attention_scores
from pruneware.plans.plan import Stage
from pruneware.policies import Policy, StageInput
from pruneware.policies.base import TextRows
from pruneware.policies.needs import Needs, Query, query_rows

if TYPE_CHECKING:
    from pruneware.engine.request import RequestState


def no_grad() -> contextlib.AbstractContextManager:
    """`torch.no_grad()`, or nothing when gradients are already off (generate, inference)."""
    return torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext()


# capture ---------------------------------------------------------------------------------
def captures_at(needs: Needs, preview: bool) -> bool:
    """Whether the attention now running feeds this policy's stage: its layer's own attention
    in a preview (`attention="own"`), or the layer before it (`attention="previous"`)."""
    return needs.attention == ("own" if preview else "previous")


def previews(needs: Needs) -> bool:
    """The stage ranks by its own layer's attention, previewed on the unpruned input first."""
    return needs.attention == "own"


@dataclass
class QueryRows:
    """A policy's query rows at one level.

    Attributes:
        slots: [B, T] slot index of each row (left-aligned); None for the last slot alone
            when nothing reads it (that row sees every key: no causal mask).
        valid: [B, T] bool, the rows that count.
        run: the slots as one `slice` shared by every sample, known on the host (the rows are
            then read by slicing, with no gather), else None.
    """

    slots: torch.Tensor | None
    valid: torch.Tensor
    run: slice | None


def query_layout(
    query: Query, level: Level, real: torch.Tensor | None, width: int | None, device: torch.device, block: bool,
) -> QueryRows:
    """The `query` rows of `level` (see `Needs.query`); width: a host-known upper bound of any
    sample's row count, or None (then read on the host: a device sync); block: the policy reads
    the attention among its rows (which needs their slots).

    real: [B, Ls] bool, or None when every slot holds a real token (then the rows are all valid).
    The last slot, and the text after a visual run that every sample shares (`Level.visual_span`),
    are runs known on the host: sliced, never sorted or gathered.
    """
    batch, length = level.index0.shape
    if query == "last" or (query == "post-image" and level.visual_span is not None and level.all_valid):
        first = length - 1 if query == "last" else sum(level.visual_span)  # type: ignore[arg-type]
        slots = slot_run(batch, first, length, device) if query != "last" or block else None
        valid = identity_tensors(batch, length - first, device)[1] if real is None else real[:, first:]
        return QueryRows(slots, valid, slice(first, length))
    if query == "post-image" and level.visual_starts is not None and level.all_valid:
        # Each sample's run ends at its own slot: the rows are the run of slots after the earliest
        # end, each sample's own from its end on (known on the host), so sliced as above.
        ends = tuple(start + n for start, n in zip(level.visual_starts, level.n_visual, strict=True))
        first = min(ends)
        if first < length:
            after = post_image_rows(ends, length, device)  # [B, T] bool
            # The slots always: they are the rows' causal mask (a text row must not see later text).
            slots = slot_run(batch, first, length, device)
            return QueryRows(slots, after if real is None else after & real[:, first:], slice(first, length))
    if real is None:
        real = level.valid
    slots, valid = query_rows(query, level.visual, real, width)
    return QueryRows(slots, valid, None)


def attention_policy_scores(
    policy: Policy, rows: QueryRows, real: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor,
    scale: float | None, rater_slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, Ls] weighted attention the policy's query rows pay each slot (or its key norm).

    query: [B, H, Ls, d] post-RoPE; key: [B, Hkv, Ls, d] (not repeated for GQA); real: [B, Ls]
    bool key mask, or None when every slot holds a real token; rater_slots: [B, Ls] bool, for
    `Needs(raters=True)`: the slots whose rows count.
    """
    needs = policy.needs
    with no_grad():  # scores only: never part of a graph
        if needs.captures == "key-norm":
            return key_norms(key)  # [B, Ls]: L1 norm over every key head (one kernel call)
        row_valid = rows.valid
        if rater_slots is not None:
            # The raters are some of level 0's query rows (real text, which no stage drops), so a
            # row that holds one is a valid row: the raters alone are the rows that count.
            if rows.run is not None:
                row_valid = rater_slots[:, rows.run]
            else:
                row_valid = rater_slots.gather(1, rows.slots)  # type: ignore[arg-type]
        if rows.run is not None:
            q_rows = query[:, :, rows.run]  # [B, H, T, d]
        else:
            heads, dim = query.shape[1], query.shape[3]
            slots: torch.Tensor = rows.slots  # type: ignore[assignment]  # without a run the slots are given
            index = slots.view(slots.shape[0], 1, -1, 1).expand(-1, heads, -1, dim)
            q_rows = query.gather(2, index)  # [B, H, T, d]
        fused = policy.fused_attention_scores(q_rows, key, row_valid, rows.slots, real, scale, rows.run)
        if fused is not None:  # the policy's whole score in one kernel call
            return fused
        block = needs.query_block is not None
        if block:  # weights from the block among the rows, one softmax for both
            weights = partial(policy.row_weights, row_valid=row_valid)
        else:
            weights = policy.row_weights(None, row_valid)
        scores, _ = attention_scores(
            q_rows, key, weights, query_positions=rows.slots, key_mask=real, scale=scale,
            per_head_block=needs.query_block == "per-head", check_positions=False, live_rows=True,
        )
        return scores


def post_image_width(state: RequestState) -> int | None:
    """An upper bound, known on the host, of any sample's text rows after its last visual token:
    the input positions after its visual run (stages keep every text token), or None."""
    spans, length = state.prefill.layout.spans, state.decode.input_length
    if not spans or any(span is None for span in spans):
        return None
    return max(length - start - n if n else length for start, n in spans)


def rater_slots(state: RequestState, policy: Policy) -> torch.Tensor:
    """[B, L0] bool: the policy's rater slots, chosen once per prefill from the LM's input."""
    prefill = state.prefill
    if prefill.raters is None:
        if prefill.lm_embeds is None:
            raise RuntimeError(f"{policy.name} rates text from the language model's input, which was not recorded")
        root = state.levels[0]
        real = state.real_tokens(root)
        query = policy.needs.query
        host = host_post_image(state, root.length, real.device) if query == "post-image" else None
        if host is not None:  # from the layout: no sort, no scatter
            visual, text = host
            text = text if state.padding0 is None else text & real
        else:
            visual = root.visual
            width = post_image_width(state) if query == "post-image" else None
            rows, row_valid = query_rows(query, visual, real, width)
            text = torch.zeros_like(real).scatter_(1, rows, row_valid)
        with torch.no_grad():
            prefill.raters = policy.raters(prefill.lm_embeds, visual, text)
    return prefill.raters


def host_post_image(state: RequestState, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """([B, L0] bool visual slots, [B, L0] bool slots after each sample's visual run: all of them
    without one), made on the host from the layout's runs (numpy, handed over by DLPack; one copy
    each to a GPU) when level 0 is the model's own input (no `pre` or vision-side stage) and each
    sample's visual tokens are one run of positions; else None."""
    plan, spans = state.plan, state.prefill.layout.spans
    if plan.vision or (plan.stages and plan.stages[0].where == "pre") or not spans or None in spans:
        return None
    slots = np.arange(length)
    starts = np.array([start for start, _ in spans])[:, None]  # type: ignore[misc]
    ends = starts + np.array([n for _, n in spans])[:, None]  # type: ignore[misc]
    visual, after = (slots >= starts) & (slots < ends), slots >= np.where(ends > starts, ends, 0)
    if device.type == "cpu":
        return as_tensor(visual), as_tensor(after)
    return as_tensor(visual).to(device), as_tensor(after).to(device)


def captured_scores(
    state: RequestState, policy: Policy, level: Level, query: torch.Tensor, key: torch.Tensor, scale: float | None,
    rotary: Callable | None = None,
) -> torch.Tensor:
    """[B, Ls] what the stage ahead keeps from this attention call (see `attention_policy_scores`).

    rotary: the model's RoPE tables (`Adapter.rope_tables`), for scores that read keys' absolute
    values: a padded sample's keys are rotated to the positions it has alone (key_positions.py)."""
    real = state.real_tokens(level)
    if state.static_len is not None:  # a static cache returns all its slots; the prefill fills the first Ls
        key = key[:, :, : level.length]
    if policy.needs.captures == "key-norm":  # the key norms read no query rows: none are laid out
        if rotary is not None:
            key = keys_as_alone(key, first_real_shift(state, level), rotary)
        return key_norms(key)  # [B, Ls]: L1 norm over every key head (one kernel call)
    needs = policy.needs
    raters = rater_slots(state, policy) if needs.raters else None
    if raters is not None and level is not state.levels[0]:  # level 0's slots are its own: no gather
        raters = raters.gather(1, level.index0)
    key_mask = None if state.padding0 is None and level.all_valid else real
    width = post_image_width(state) if needs.query == "post-image" else None
    # Rater rows are real tokens, and they alone count: the rows' own validity is not needed (no AND with the keys').
    row_mask = key_mask if raters is None else None
    rows = query_layout(needs.query, level, row_mask, width, query.device, needs.query_block is not None)
    return attention_policy_scores(policy, rows, key_mask, query, key, scale, raters)


# context ---------------------------------------------------------------------------------
@dataclass
class StageContext:
    """Everything one stage runs with.

    Attributes:
        policy, stage: the stage and its built policy; level: the level it prunes.
        hidden: [B, Ls] the level's states (through the final norm for `needs.final_norm`).
        n_visual: each sample's original visual-token count (ratios apply to it).
        seed: the stage's seed; grids: per sample, (h, w) per image.
        sample_stages: per sample, the stage with that sample's own budget.
        attention: [B, Ls] captured scores (`needs.attention`).
        vision: (scores [B, Ls] or None, keys [B, Ls, d] or None, per-sample tower grids or
            None) for `needs.vision`.
        real: [B, Ls] bool, slots holding a real token (`needs.attention`).
        text_width: a host-known upper bound of any sample's text rows (`post_image_width`), or None.
    """

    policy: Policy
    stage: Stage
    level: Level
    hidden: torch.Tensor
    n_visual: list[int]
    seed: int
    grids: list[list[tuple[int, int]]]
    sample_stages: list[Stage] | None = None
    attention: torch.Tensor | None = None
    vision: tuple | None = None
    real: torch.Tensor | None = None
    text_width: int | None = None


def stage_context(
    state: RequestState, stage_index: int, policy: Policy, level: Level, hidden: torch.Tensor, seed: int,
    vision_reads: list | None, norm: Callable[[torch.Tensor], torch.Tensor],
) -> StageContext:
    """The context of stage `stage_index`, from what its policy declares.

    vision_reads: what the vision tower gave this request (a `pre` stage of a session that hooks
    the tower), else None; norm: the language model's final norm.
    """
    stage, prefill, needs = state.plan.stages[stage_index], state.prefill, policy.needs
    attention = real = vision = None
    if needs.attention is not None:
        if stage.layer not in prefill.captured:
            source = stage.layer if needs.attention == "own" else stage.layer - 1
            raise PlanError(f"stage {stage}: no attention rows were captured at layer {source}; "
                            "its attention did not run through the pruneware capture")
        attention = prefill.captured.pop(stage.layer)
    if vision_reads is not None:
        image_ids = prefill.layout.image_ids
        image_ids = image_ids if image_ids.device == hidden.device else image_ids.to(hidden.device)
        vision = reads_to_positions(vision_reads, image_ids, prefill.layout.grids, "keys" in needs.vision)
    if needs.attention is not None or needs.text:
        real = state.real_tokens(level)
    if needs.attention is not None:
        if needs.final_norm:
            with torch.no_grad():
                hidden = norm(hidden)
    text_width = post_image_width(state) if needs.text and needs.query == "post-image" else None
    return StageContext(
        policy, stage, level, hidden, prefill.n_visual, seed, prefill.layout.grids, state.sample_stages(stage_index),
        attention, vision, real, text_width,
    )


# StageInput --------------------------------------------------------------------------------
@lru_cache(maxsize=32)
def _zeros(batch: int, n: int, device: torch.device, inference: bool) -> torch.Tensor:
    return torch.zeros(batch, n, dtype=torch.long, device=device)


def zeros_long(batch: int, n: int, device: torch.device) -> torch.Tensor:
    """[B, n] long zeros, made once per shape, device and inference mode (see `identity_tensors`)."""
    return _zeros(batch, n, device, torch.is_inference_mode_enabled())


def visual_picker(level: Level) -> Callable[[torch.Tensor], torch.Tensor]:
    """[B, Ls, ...] -> [B, n, ...]: the level's visual slots, in slot order (n: the most per sample)."""
    n = max(level.n_visual, default=0)
    span = level.visual_span
    if span is not None:  # the visual slots are one known run in every sample: slice, no sort or gather
        visual_slots = slice(span[0], span[0] + n)

        def pick(x: torch.Tensor) -> torch.Tensor:  # contiguous
            y = x[:, visual_slots]
            return y if y.shape[0] == 1 else y.contiguous()  # one sample: a slice is contiguous
        return pick
    if level.visual_starts is not None and min(level.n_visual) == n:  # one run per sample, n each: host-built slots
        order = run_slots(level.visual_starts, n, level.index_prev.device)

        def pick_run(x: torch.Tensor) -> torch.Tensor:
            return gather_rows(order, x)[0]
        return pick_run
    order = level.visual_first[:, :n]  # visual slots first

    def pick_gathered(x: torch.Tensor) -> torch.Tensor:
        return gather_rows(order, x)[0] if x.dim() == 3 else x.gather(1, order)
    return pick_gathered


def stage_input(ctx: StageContext, pick: Callable[[torch.Tensor], torch.Tensor]) -> StageInput:
    """The policy's `StageInput`: the visual slots `pick` takes, and what its `needs` declares."""
    level, hidden = ctx.level, ctx.hidden
    host_counts = level.n_visual  # host-side: no sync
    n = max(host_counts, default=0)
    device = level.image_ids.device
    states = pick(hidden)
    full = min(host_counts, default=n) == n  # every sample has n visual tokens: nothing to mask
    one_image = full and level.image_sizes is not None and all(len(s) == 1 for s in level.image_sizes)
    # One image per sample: every id is 0, known on the host (a shared zero tensor, never written).
    image_ids = zeros_long(len(host_counts), n, device) if one_image else pick(level.image_ids)
    if full:
        token_valid = identity_tensors(image_ids.shape[0], n, device)[1]  # shared all-True [B, n], never written
    else:
        token_valid = torch.arange(n, device=device)[None] < level.visual.sum(dim=1)[:, None]
        states = states * token_valid[..., None].to(hidden.dtype)
        image_ids = image_ids.masked_fill(~token_valid, -1)
    inputs = StageInput(
        hidden=states,
        valid=token_valid,
        image_ids=image_ids,
        attention=None if ctx.attention is None else pick(ctx.attention),
        seed=ctx.seed,
        layer=ctx.stage.layer,
        grids=ctx.grids,
        text=text_rows(ctx) if ctx.policy.needs.text else None,
        sizes=level.image_sizes,
    )
    if ctx.vision is not None:
        scores, keys, inputs.vision_grids = ctx.vision
        if scores is not None:
            inputs.vision_scores = pick(scores) if full else pick(scores).masked_fill(~token_valid, 0.0)
        if keys is not None:
            inputs.vision_keys = pick(keys) if full else pick(keys) * token_valid[..., None]
    return inputs


def text_rows(ctx: StageContext) -> TextRows:
    """The states and captured values (None without `needs.attention`) of the policy's query
    rows (`Needs(text=True)`)."""
    if ctx.real is None:
        raise RuntimeError(f"{ctx.policy.name} needs the real-token mask at its text rows")
    hidden, attention = ctx.hidden, ctx.attention
    rows = query_layout(ctx.policy.needs.query, ctx.level, ctx.real, ctx.text_width, hidden.device, block=True)
    if rows.run is not None:  # one run of slots in every sample, known on the host: sliced, not gathered
        text_hidden, score = hidden[:, rows.run], None if attention is None else attention[:, rows.run]
    else:
        slots: torch.Tensor = rows.slots  # type: ignore[assignment]  # without a run the slots are given
        text_hidden, score = gather_rows(slots, hidden)[0], None if attention is None else attention.gather(1, slots)
    return TextRows(text_hidden * rows.valid[..., None], rows.valid, score)  # bool promotes to the states' dtype
