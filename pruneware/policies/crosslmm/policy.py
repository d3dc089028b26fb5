"""`crosslmm`: pool each image's token grid, then refine the pooled tokens by cross-attention.

CrossLMM (Decoupling Long Video Sequences from LMMs via Dual Cross-Attention) pools visual
tokens on their grid and lets the pooled tokens attend to the original ones (V2V) with a gated
residual. This is a *merging* policy: it returns new embeddings for the kept slots.

Modes (plan parameters in brackets):
  - training-free (default): `refined = pooled + gate * (attend(pooled, originals) - pooled)`,
    parameter-free scaled dot-product attention in the embedding space; `gate` in [0, 1]
    (default 0.5; 0 is plain average pooling).
  - trained: `compressor=DIR` (or its older spelling `adapter=DIR`) loads the V2V projections
    trained by `pruneware train-adapter` (`python -m pruneware.tuning.crosslmm`, see compressor.py):
    `refined = pooled + tanh(g) * attention(Wq pooled, Wk x, Wv x)`, g initialised to 0.
The pooled grid is `factor` x `factor` bins (`factor=3`), or the largest grid of the image's
aspect within the stage's per-image budget. Runs at `pre` only.

An image whose pooled grid is its own grid (a budget of all its tokens, or `factor=1`) is
not pooled, so it is not refined either: it passes through unchanged, in both modes, and a
keep-everything plan is the unpruned model (the paper refines what pooling compressed).

Positions: each pooled token stands at its bin's first token. On 1-D RoPE models it takes that
token's position; on M-RoPE models the engine gives the pooled tokens the positions of the
pooled grid, as if the image had that lower resolution (see the Qwen adapter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pruneware.policies.base import MergeResult, Policy, StageInput, register_policy
from pruneware.policies.pooling import (
    batch_firsts, cross_attend, cross_attend_batched, merge_per_image, pool_grid, pool_grids, pooled_shape, uniform_grid,
)
from pruneware.policies.needs import Needs


@register_policy
@dataclass(frozen=True)
class CrossLMMPolicy(Policy):
    name = "crosslmm"
    needs: ClassVar[Needs] = Needs(output="merge")
    description = "CrossLMM: grid pooling + V2V cross-attention refinement (training-free or trained)."
    factor: int | None = None
    gate: float = 0.5
    compressor: str | None = None
    adapter: str | None = None  # the older name of `compressor`, kept for plans that use it

    def __post_init__(self) -> None:
        if self.factor is not None and (not isinstance(self.factor, int) or self.factor < 1):
            raise TypeError(f"factor must be an integer >= 1, got {self.factor!r}")
        if not 0.0 <= float(self.gate) <= 1.0:
            raise TypeError(f"gate must be in [0, 1], got {self.gate!r}")
        if self.compressor is not None and self.adapter is not None:
            raise TypeError("give the trained compressor once: compressor=DIR (adapter=DIR is its older name)")

    @property
    def compressor_dir(self) -> str | None:
        """The trained compressor's directory (or live key), under either name; None: training-free."""
        return self.compressor if self.compressor is not None else self.adapter

    def _refine(self, pooled: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if self.compressor_dir is not None:
            from pruneware.policies.crosslmm.compressor import load_compressor  # safetensors: only when used

            module = load_compressor(self.compressor_dir, tokens.shape[-1])
            return module(pooled, tokens)
        if self.gate == 0:
            return pooled
        return pooled + self.gate * (cross_attend(pooled, tokens) - pooled)

    def merge(self, inputs: StageInput, counts: list[int]) -> MergeResult:
        uniform = uniform_grid(inputs, counts) if self.compressor_dir is None else None
        if uniform is not None:  # one image of one grid per sample: every image at once
            h, w, budget = uniform
            ph, pw = pooled_shape(h, w, budget, self.factor)
            batch = inputs.hidden.shape[0]
            if (ph, pw) == (h, w):  # nothing pooled: kept as it is (see the module's docstring)
                keep = batch_firsts(batch, h, w, h, w, inputs.hidden.device)[1]
                return MergeResult(keep, inputs.hidden, [[(h, w)] for _ in range(batch)])
            keep = batch_firsts(batch, h, w, ph, pw, inputs.hidden.device)[1]
            pooled = pool_grids(inputs.hidden, h, w, ph, pw)
            if self.gate != 0:
                pooled = torch.add(pooled, cross_attend_batched(pooled, inputs.hidden) - pooled, alpha=self.gate)
            return MergeResult(keep, pooled, [[(ph, pw)] for _ in range(batch)])

        def merge_image(b, _image, members, hw, budget):
            ph, pw = pooled_shape(*hw, budget, self.factor)
            tokens = inputs.hidden[b, members]
            if (ph, pw) == hw:  # nothing pooled: every bin is one token, kept as it is
                return members, tokens, hw
            pooled, first = pool_grid(tokens, *hw, ph, pw)
            return members[first], self._refine(pooled, tokens), (ph, pw)

        return merge_per_image(inputs, counts, merge_image)

    def select(self, inputs: StageInput, counts: list[int]) -> list[torch.Tensor]:
        return self.merge(inputs, counts).keep
