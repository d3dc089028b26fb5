"""Run a pre-LLM policy on one multimodal item (an image, or a video's frames) inside vLLM.

The policies are pruneware's own (`pruneware.policies`): an item becomes one sample whose
"images" are its frames, so the shared budget split gives every frame exactly its
`FrameLayout.count` tokens, and the policy runs per frame. This module does not import vllm.
"""

from __future__ import annotations

import torch

from pruneware.integrations.vllm.spec import PruneSpec
from pruneware.policies import StageInput


def item_input(spec: PruneSpec, features: torch.Tensor, grid: tuple[int, int, int]) -> StageInput:
    """The StageInput for one item. features: [T*h*w, C] in (frame, row, col) raster order."""
    frames, rows, cols = grid
    n = frames * rows * cols
    if features.shape[0] != n:
        raise ValueError(f"item of grid {grid} should have {n} tokens, got {features.shape[0]}")
    device = features.device
    return StageInput(
        hidden=features[None],  # [1, N, C]
        valid=torch.ones(1, n, dtype=torch.bool, device=device),
        image_ids=torch.arange(frames, device=device).repeat_interleave(rows * cols)[None],
        attention=None,
        seed=spec.stage_seed,
        layer=0,
        grids=[[(rows, cols)] * frames],
    )


def prune_item(
    spec: PruneSpec, embeds: torch.Tensor, grid: tuple[int, int, int], vision: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one item's projected embeddings.

    Args:
        embeds: [T*h*w, D] the item's embeddings as the LLM would receive them.
        grid: (T, h, w) frames and token rows and columns per frame.
        vision: [T*h*w, C] vision-side features, scored instead of `embeds` by policies that
            want them (`vision-score`); None to score `embeds`.
    Returns:
        rows: [T*k, D] the kept rows of `embeds` in original order, or the merged rows
            (pooling), frame by frame; k = spec.frame(h, w).count.
        keep: [T*k] long, for each row the index of the original token it stands at.
    """
    frames, rows, cols = grid
    policy = spec.policy
    expected = spec.item_tokens(frames, rows, cols)
    scored = vision if vision is not None and policy.needs.vision_features else embeds
    # The per-frame budget, not the layout's count: pooling turns the budget into its grid, and
    # pooled_shape(h, w, rows * cols) need not give back the same (rows, cols).
    count = [frames * spec.budget(rows, cols)]
    if policy.needs.merges:
        merged = policy.merge(item_input(spec, embeds, grid), count)
        out, keep = merged.embeds[0].to(embeds.dtype), merged.keep[0]
    else:
        keep = policy.select(item_input(spec, scored, grid), count)[0]
        out = embeds[keep]
    if out.shape[0] != expected:
        raise RuntimeError(
            f"policy {policy.name!r} returned {out.shape[0]} tokens for grid {grid}, but the prompt "
            f"holds {expected} placeholders for it"
        )
    return out, keep


def deep_levels(spec: PruneSpec, kept: int, original: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Which in-LLM stage drops each of an item's `kept` placeholder tokens.

    The item is one sample, as in the HF session with one image per sample: in-LLM stage i keeps
    `stage.keep_count(original, alive)` of the `alive` tokens it receives, chosen by its policy
    (which reads no states: `Needs.states` is False) with the seed the HF session gives it.
    Returns [kept] long: 0 for a token every stage keeps, i + 1 for one that stage i drops.
    """
    levels = torch.zeros(kept, dtype=torch.long)
    alive = torch.arange(kept)
    for i, stage in enumerate(spec.deep):
        if spec.deep_policies[i].needs.states:
            break  # scored in the step (deep_scoring), as are the stages after it
        n = alive.numel()
        count = min(n, stage.keep_count(original, n))
        if count == n or n == 0:
            continue
        stage_input = StageInput(
            hidden=torch.zeros(1, n, 1), valid=torch.ones(1, n, dtype=torch.bool),
            image_ids=torch.zeros(1, n, dtype=torch.long), attention=None, seed=spec.deep_seed(i),
            layer=int(stage.where), grids=[[(1, n)]],
        )
        keep = spec.deep_policies[i].select(stage_input, [count])[0].cpu()
        dropped = torch.ones(n, dtype=torch.bool)
        dropped[keep] = False
        levels[alive[dropped]] = i + 1
        alive = alive[~dropped]
    return levels.to(device)
