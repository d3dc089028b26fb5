"""`resize`: the matched-token baseline, a lower resolution instead of a smarter selection.

Plain downsampling to the same token count beats many compression methods on Qwen2-VL
(VTC-Bench, arXiv 2510.07143), so every policy should beat this one to earn its complexity.

  - Dynamic-resolution models (Qwen2-VL, Qwen2.5-VL): each image goes through the vision
    tower at the resolution whose token count fits its budget, the processor's `smart_resize`
    rule with `max_pixels` = budget x (patch x merge)^2, so the tower does less work too. The
    session resamples the processed patches inside the tower's call (see
    `pruneware.engine.vision_tower_reads`), which works under `run`, `eval`, `bench` and any caller's own
    processor; this `pre` stage then keeps the tower's tokens, which get the M-RoPE positions
    of their smaller grid, exactly as if the image had been given at that size.
  - Fixed-resolution towers (LLaVA-1.5 at 336 px): the 24x24 grid of projected tokens is
    average-pooled to the largest grid of the image's aspect within the budget (this is
    `crosslmm[gate=0]`); each pooled token stands at its bin's first token.

Differences from processing the original image at the lower `max_pixels`: the resampling
(bicubic, antialiased, in torch) starts from the processed image rather than the original
file, and on normalised values rather than 8-bit pixels. The token count is the largest grid
within the budget, so it can fall a little short of it (e.g. 121 = 11 x 11 for 128 on a
square image). On Qwen each image's budget is fixed when its pixels are encoded, before the
engine knows which sample they belong to: a ratio budget (e.g. `resize@pre:0.25`) applies per
image; a count budget is exact for one image per sample and is refused for several.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pruneware.policies.base import MergeResult, Policy, StageInput, register_policy
from pruneware.policies.pooling import (
    batch_firsts, bin_starts, merge_per_image, pool_grid, pool_grids, pooled_shape, uniform_grid,
)
from pruneware.policies.needs import Needs


@register_policy
@dataclass(frozen=True)
class ResizePolicy(Policy):
    name = "resize"
    needs: ClassVar[Needs] = Needs(vision=("resize",), output="merge")
    description = "Matched-token baseline: Qwen re-encodes each image at the budget's resolution; LLaVA average-pools its grid."

    def merge(self, inputs: StageInput, counts: list[int]) -> MergeResult:
        device = inputs.hidden.device
        batched = self._merge_batched(inputs, counts)
        if batched is not None:
            return batched

        def merge_image(b, image, members, hw, budget):
            h, w = hw
            if inputs.vision_grids is not None:  # the tower already ran at the lower resolution
                ph, pw = inputs.vision_grids[b][image]
                rows = torch.tensor(bin_starts(h, ph), device=device)
                cols = torch.tensor(bin_starts(w, pw), device=device)
                slots = members[(rows[:, None] * w + cols[None, :]).reshape(-1)]
                return slots, inputs.hidden[b, slots], (ph, pw)
            ph, pw = pooled_shape(h, w, budget)
            pooled, first = pool_grid(inputs.hidden[b, members], h, w, ph, pw)
            return members[first], pooled, (ph, pw)

        result = merge_per_image(inputs, counts, merge_image)
        for b, sample_grids in enumerate(result.grids):
            total = sum(p * q for p, q in sample_grids)
            if len(sample_grids) > 1 and total > counts[b] + len(sample_grids):
                raise ValueError(
                    f"sample {b}: its {len(sample_grids)} images were re-encoded at {total} tokens in all, over its "
                    f"budget of {counts[b]}: each image's resolution is fixed before the sample is known, so give "
                    "resize a ratio budget (e.g. resize@pre:0.25) for several images per sample"
                )
        return result

    def _merge_batched(self, inputs: StageInput, counts: list[int]) -> MergeResult | None:
        """`merge` when every sample holds one image of one grid and one budget (see
        `uniform_grid`): every image at once, a few ops in all rather than a few per image."""
        uniform = uniform_grid(inputs, counts)
        if uniform is None:
            return None
        h, w, budget = uniform
        batch = inputs.hidden.shape[0]
        if inputs.vision_grids is not None:  # the tower already ran at the lower resolution
            towers = {tuple(g[0]) if len(g) == 1 else None for g in inputs.vision_grids}
            if len(towers) != 1 or None in towers:
                return None
            ph, pw = towers.pop()  # type: ignore[misc]
            first, keep = batch_firsts(batch, h, w, ph, pw, inputs.hidden.device)
            return MergeResult(keep, inputs.hidden.index_select(1, first), [[(ph, pw)] for _ in range(batch)])
        ph, pw = pooled_shape(h, w, budget)
        keep = batch_firsts(batch, h, w, ph, pw, inputs.hidden.device)[1]
        return MergeResult(keep, pool_grids(inputs.hidden, h, w, ph, pw), [[(ph, pw)] for _ in range(batch)])

    def select(self, inputs: StageInput, counts: list[int]) -> list[torch.Tensor]:
        return self.merge(inputs, counts).keep
