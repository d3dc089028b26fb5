"""`cdpruner`: conditional diversity by a DPP (CDPruner, NeurIPS 2025, Theia-4869/CDPruner).

The kept set is the greedy MAP of a determinantal point process whose kernel is the visual
tokens' cosine similarity conditioned on the instruction:
``L_ij = r_i cos(x_i, x_j) r_j``, with ``x`` the projected visual tokens and ``r_i`` token i's
relevance to the instruction, min-max normalised over the sample's visual tokens as the official
code does (``(r - min + 1e-6) / (max - min)``). The greedy MAP (Fast-MAP-DPP) is
`pruneware.kernels.cdpruner.conditional_dpp`: one Triton launch on CUDA, numpy on the CPU, the
plain-torch reference beside them; with one image per sample, `pruneware.kernels.cdpruner.select`
computes the relevance, the kernel matrix and the greedy MAP in one call.

Relevance. The official code compares CLIP's patch embeddings with CLIP's text embedding of the
question, and negates their mean cosine (``(-relevance).mean(dim=-1)``). It has no path for a
model without a CLIP text tower (none of pruneware's adapters exposes one). Here, as in OpenVINO
GenAI's CDPruner for Qwen2-VL, the instruction is the language model's own input embeddings of
the text after the image (the `post-image` rows; the projected visual tokens live in that same
space), and ``r_i`` is the mean cosine between visual token i and those rows, with the sign
`relevance` picks: "positive" (default; OpenVINO's choice for non-CLIP models), "negative"
(the official CLIP sign) or "none" (``r = 1``: a plain DPP over the similarity, no instruction).
`theta` in (0, 1) turns on the official code's commented-out option ``r = exp(alpha r)``,
``alpha = theta / (2 (1 - theta))``; None (default) leaves it off, as the official scripts do.

Deliberate differences from the official code, which select the same tokens otherwise:
  - the relevance is normalised per sample (official: over its batch, which is one request's
    images or LLaVA-NeXT crops); each image of a sample gets its share of the budget;
  - when the kernel's rank (at most the feature width) runs out before k picks, the greedy
    starts a new round over the tokens not yet chosen (official: NaN residuals, repeated picks,
    fewer than k tokens kept); see `pruneware.kernels.cdpruner.reference`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pruneware.kernels.cdpruner import RELEVANCE, conditional_dpp, instruction_relevance, select
from pruneware.policies.base import Policy, StageInput, image_groups, register_policy, split_budget
from pruneware.policies.needs import Needs

__all__ = ["RELEVANCE", "CDPrunerPolicy", "instruction_relevance"]  # the relevance lives with the kernels


@register_policy
@dataclass(frozen=True)
class CDPrunerPolicy(Policy):
    name = "cdpruner"
    needs: ClassVar[Needs] = Needs(text=True, query="post-image")
    description = "CDPruner: greedy MAP of a DPP on visual similarity conditioned on instruction relevance."
    relevance: str = "positive"
    theta: float | None = None

    def __post_init__(self) -> None:
        if self.relevance not in RELEVANCE:
            raise TypeError(f"relevance must be one of {RELEVANCE}, got {self.relevance!r}")
        if self.theta is not None and not (isinstance(self.theta, float | int) and 0 < self.theta < 1):
            raise TypeError(f"theta must be None or a number in (0, 1), got {self.theta!r}")

    def select(self, inputs: StageInput, counts: list[int]) -> list[torch.Tensor] | torch.Tensor:
        if inputs.text is None:
            raise RuntimeError("cdpruner reads the instruction's text rows; the engine gave none")
        device = inputs.hidden.device
        sizes = inputs.image_sizes()
        n = inputs.hidden.shape[1]
        if n and all(s == [n] for s in sizes) and len(set(counts)) == 1:
            # One full-width image per sample and one budget: the rows are the images, in order;
            # relevance, kernel matrix and greedy MAP in one call; [B, k], row b sample b's (no split).
            return select(inputs.hidden, inputs.text.hidden, inputs.text.valid, split_budget([n], counts[0])[0],
                          self.relevance, self.theta)
        relevance = instruction_relevance(
            inputs.hidden, inputs.valid, inputs.text.hidden, inputs.text.valid, self.relevance, self.theta,
        )
        out: list[list[torch.Tensor]] = [[] for _ in sizes]
        for (_, k), items in image_groups(inputs, sizes, counts).items():
            if k == 0:
                continue
            feats = torch.stack([inputs.hidden[b, members] for b, members in items])
            rel = torch.stack([relevance[b, members] for b, members in items])
            picked = conditional_dpp(feats, rel, k)
            for (b, members), row in zip(items, picked, strict=True):
                out[b].append(members[row])
        return [
            torch.cat(parts).sort().values if parts else torch.zeros(0, dtype=torch.long, device=device)
            for parts in out
        ]
