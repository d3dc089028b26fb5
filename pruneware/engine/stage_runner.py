"""Running one stage's policy on a level: score with attention rows if the policy needs them,
gather the visual slots, call the policy, report."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from pruneware.engine.levels import Level
from pruneware.kernels.gather import gather_rows
from pruneware.kernels.scores import attention_scores
from pruneware.plans.plan import Stage
from pruneware.policies import AttentionPolicy, MergeResult, Policy, StageInput
from pruneware.policies.base import TextRows
from pruneware.report import StageReport


def _no_grad() -> contextlib.AbstractContextManager:
    """`torch.no_grad()`, or nothing when gradients are already off (generate, inference)."""
    return torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext()


@dataclass
class Selection:
    """A stage's outcome: per sample, indices into the level's visual slots (in slot order)."""

    keep: list[torch.Tensor]
    merged: MergeResult | None
    report: StageReport


def run_stage(
    policy: Policy, stage: Stage, level: Level, hidden: torch.Tensor, n_visual: list[int], seed: int,
    grids: list[list[tuple[int, int]]], attention: torch.Tensor | None = None,
    sample_stages: list[Stage] | None = None, vision: tuple | None = None, real: torch.Tensor | None = None,
) -> Selection:
    """Apply `policy` to the visual slots of `level`.

    hidden: [B, Ls, D] the level's states; n_visual: each sample's original visual-token count
    (ratios apply to it); attention: [B, Ls] captured scores for attention policies;
    sample_stages: per sample, the stage with that sample's own budget (default: `stage`);
    vision: (scores [B, Ls] or None, keys [B, Ls, d] or None, per-sample tower grids or None)
    for policies that read the vision tower.
    real: [B, Ls] bool, slots holding a real token (needed by policies with `needs_text`).
    """
    host_counts = level.n_visual  # host-side: no sync
    n = max(host_counts, default=0)
    per_sample = sample_stages or [stage] * len(n_visual)
    budgets = [min(s.keep_count(nv, now), now) for s, nv, now in zip(per_sample, n_visual, host_counts, strict=True)]
    span = level.visual_span
    if span is not None:  # the visual slots are one known run in every sample: slice, no sort or gather
        start = span[0]
        visual_slots = slice(start, start + n)

        def pick(x: torch.Tensor) -> torch.Tensor:  # [B, Ls, ...] -> [B, n, ...], contiguous
            y = x[:, visual_slots]
            return y if y.shape[0] == 1 else y.contiguous()  # one sample: a slice is contiguous
    else:
        order = level.visual_first[:, :n]  # visual slots first

        def pick(x: torch.Tensor) -> torch.Tensor:
            return gather_rows(order, x)[0] if x.dim() == 3 else x.gather(1, order)
    device = level.image_ids.device
    states = pick(hidden)
    image_ids = pick(level.image_ids)
    if min(host_counts, default=n) == n:  # every sample has n visual tokens: nothing to mask
        token_valid = torch.ones(image_ids.shape, dtype=torch.bool, device=device)
    else:
        token_valid = torch.arange(n, device=device)[None] < level.visual.sum(dim=1)[:, None]
        states = states * token_valid[..., None].to(hidden.dtype)
        image_ids = image_ids.masked_fill(~token_valid, -1)
    inputs = StageInput(
        hidden=states,
        valid=token_valid,
        image_ids=image_ids,
        attention=None if attention is None else pick(attention),
        seed=seed,
        layer=stage.layer,
        grids=grids,
        text=text_rows(policy, level, hidden, attention, real) if getattr(policy, "needs_text", False) else None,
        sizes=level.image_sizes,
    )
    if vision is not None:
        scores, keys, inputs.vision_grids = vision
        if scores is not None:
            inputs.vision_scores = pick(scores).masked_fill(~token_valid, 0.0)
        if keys is not None:
            inputs.vision_keys = pick(keys) * token_valid[..., None]
    merged = None
    if policy.merges:
        merged = policy.merge(inputs, budgets)
        keep = merged.keep
    elif policy.recycles:
        with _no_grad():
            merged = policy.merge(inputs, budgets)
        keep = merged.keep
    else:
        with _no_grad():
            keep = policy.select(inputs, budgets)
    originals = pick(level.orig)
    kept = [originals[b, k if k.device == originals.device else k.to(originals.device)] for b, k in enumerate(keep)]
    report = StageReport(stage.where, stage.policy, kept, list(host_counts), [k.numel() for k in keep])
    return Selection(keep, merged, report)


def text_rows(
    policy: AttentionPolicy, level: Level, hidden: torch.Tensor, attention: torch.Tensor | None,
    real: torch.Tensor | None,
) -> TextRows:
    """The states and captured values of the policy's query rows. hidden: [B, Ls, D]; attention, real: [B, Ls]."""
    if attention is None or real is None:
        raise RuntimeError(f"{policy.name} needs its captured values and the real-token mask at its text rows")
    rows, row_valid = query_rows(policy, level.visual, real)
    text_hidden = gather_rows(rows, hidden)[0] * row_valid[..., None].to(hidden.dtype)
    return TextRows(text_hidden, row_valid, attention.gather(1, rows))


def query_rows(policy: AttentionPolicy, visual: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] slot indices of the policy's query rows (left-aligned) and their validity.

    visual, real: [B, Ls] bool (visual slots; slots holding a real, unpadded token).
    """
    return policy.query_rows(visual, real)  # the contract lives on the policy


def attention_policy_scores(
    policy: AttentionPolicy, visual: torch.Tensor, real: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
    scale: float | None, rater_slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, Ls] weighted attention the policy's query rows pay each slot, at layer K-1.

    query: [B, H, Ls, d] post-RoPE; key: [B, Hkv, Ls, d] (not repeated for GQA);
    rater_slots: [B, Ls] bool, for policies with `rates_text`: the slots whose rows count.
    """
    with _no_grad():  # scores only: never part of a graph
        if policy.captures == "key-norm":
            return key.float().abs().sum(dim=(1, 3))  # [B, Ls]: L1 norm over every key head
        rows, row_valid = query_rows(policy, visual, real)
        if rater_slots is not None:
            row_valid = row_valid & rater_slots.gather(1, rows)
        heads, dim = query.shape[1], query.shape[3]
        q_rows = query.gather(2, rows[:, None, :, None].expand(-1, heads, -1, dim))  # [B, H, T, d]
        block = None
        if policy.needs_query_block:
            _, block = attention_scores(
                q_rows, key, row_valid.float(), query_positions=rows, key_mask=real, scale=scale, return_query_block=True,
                per_head_block=policy.per_head,
            )
        weights = policy.row_weights(block, row_valid)
        scores, _ = attention_scores(q_rows, key, weights, query_positions=rows, key_mask=real, scale=scale)
        return scores
