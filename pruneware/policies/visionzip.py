"""`visionzip`: dominant tokens by [CLS] attention, the rest merged into a few contextual tokens.

Official code (dvlab-research/VisionZip, `visionzip/clip_encoder.py`), per image, at CLIP layer
-2: the dominant tokens are the top patches by [CLS] attention summed over heads; the other
patches, in their original order, are split into evenly strided *targets*
(`arange(0, n, max(1, n // c))[:c]`) and the rest; each of the rest goes to the target whose
head-averaged key is most cosine-similar, and each contextual token is its target's features
plus the mean of the features merged into it. Defaults 54+10, 108+20, 162+30 at 64/128/192
tokens; here any budget k splits the same way, round(k * 54/64) dominant.

Here the scores and keys come from the vision tower through pruneware's attention capture
(see `fastervlm`; on Qwen: the mean attention each merged patch group receives at the last
full-attention ViT block, and the group's keys averaged over its patches and heads).

Deliberate differences:
  - Merging happens on the projected embeddings that enter the LLM, not on the CLIP features
    before the projector (pruneware's `pre` stages see the LLM's input); the projector is
    nonlinear, so a contextual token is the mean of projections, not the projection of a mean.
  - The official dominant set holds the [CLS] token itself plus 53 patches (for 54); HF LLaVA
    drops [CLS] from the visual tokens, so here all 54 are patches.
  - Positions, as `crosslmm`'s pooled tokens on 1-D RoPE models: a dominant token keeps its
    own slot and position and a contextual token takes its target's (the official code
    re-packs them, dominant first, which is `compact` on LLaVA). The kept set is not a grid,
    so on M-RoPE models the tokens also keep their slots' 3-D positions.
  - On Qwen the keys are read after the ViT's 2-D RoPE (what its attention sees).
The budget is per sample and split over its images in proportion. Images only. With one image
per sample, every image merges at once in `pruneware.kernels.visionzip` (a Triton launch on CUDA,
numpy on the CPU, the plain-torch reference beside them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pruneware.kernels.visionzip import batched_merge
from pruneware.policies.base import MergeResult, Policy, StageInput, register_policy, split_budget
from pruneware.policies.fastervlm import vision_scores
from pruneware.policies.needs import Needs


def contextual_merge(hidden: torch.Tensor, keys: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's contextual tokens. hidden: [n, D], keys: [n, d], the non-dominant tokens in
    their original order; returns the targets' indices [count] and their merged states [count, D]."""
    n = hidden.shape[0]
    step = max(1, n // count)
    targets = torch.arange(0, n, step, device=hidden.device)[:count]
    others = torch.ones(n, dtype=torch.bool, device=hidden.device)
    others[targets] = False
    unit = keys / keys.norm(dim=-1, keepdim=True)
    assign = (unit[others] @ unit[targets].T).argmax(dim=1)  # [n - count]
    one_hot = torch.zeros(assign.shape[0], len(targets), dtype=torch.float32, device=hidden.device)
    one_hot[torch.arange(assign.shape[0], device=hidden.device), assign] = 1.0
    sizes = one_hot.sum(dim=0).clamp(min=1)[:, None]
    merged = one_hot.T @ hidden[others].float() / sizes
    return targets, (hidden[targets].float() + merged).to(hidden.dtype)


@register_policy
@dataclass(frozen=True)
class VisionZipPolicy(Policy):
    name = "visionzip"
    needs: ClassVar[Needs] = Needs(vision=("attention", "keys"), output="merge")
    description = "VisionZip: dominant tokens by [CLS] attention plus contextual tokens merged by key similarity, pre-LLM."
    dominant: float = 54 / 64  # share of each image's budget kept as dominant tokens

    def __post_init__(self) -> None:
        if not isinstance(self.dominant, int | float) or not 0.0 < float(self.dominant) <= 1.0:
            raise TypeError(f"dominant must be a share of the budget in (0, 1] (default 54/64), got {self.dominant!r}")

    def merge(self, inputs: StageInput, counts: list[int]) -> MergeResult:
        scores = vision_scores(inputs, self.name)
        if inputs.vision_keys is None:
            raise RuntimeError("visionzip needs the vision tower's keys; the session did not provide them")
        n = inputs.hidden.shape[1]
        if n and all(s == [n] for s in inputs.image_sizes()) and len(set(counts)) == 1 and 0 < counts[0] < n:
            # One full-width image per sample and one budget: the rows are the images, merged at once.
            slots, states = batched_merge(inputs.hidden, scores, inputs.vision_keys, counts[0], self.dominant)
            return MergeResult(slots, states, None)
        device = inputs.hidden.device
        keep, embeds = [], []
        for b, image_sizes in enumerate(inputs.image_sizes()):
            sample_keep, sample_embeds = [], []
            for image, budget in enumerate(split_budget(image_sizes, counts[b]) if image_sizes else []):
                members = (inputs.image_ids[b] == image).nonzero().squeeze(1)
                tokens = inputs.hidden[b, members]
                if budget >= len(members):
                    sample_keep.append(members)
                    sample_embeds.append(tokens)
                    continue
                n_dominant = max(1, min(budget, round(budget * self.dominant)))
                dominant = scores[b, members].topk(n_dominant).indices.sort().values
                rest = torch.ones(len(members), dtype=torch.bool, device=device)
                rest[dominant] = False
                rest = rest.nonzero().squeeze(1)
                slots, states = dominant, tokens[dominant]
                if budget > n_dominant:
                    keys = inputs.vision_keys[b, members[rest]]
                    targets, merged = contextual_merge(tokens[rest], keys, budget - n_dominant)
                    slots, order = torch.cat([dominant, rest[targets]]).sort()
                    states = torch.cat([states, merged])[order]
                sample_keep.append(members[slots])
                sample_embeds.append(states)
            if sample_keep:
                keep.append(torch.cat(sample_keep))
                embeds.append(torch.cat(sample_embeds))
            else:  # a text-only sample
                keep.append(torch.zeros(0, dtype=torch.long, device=device))
                embeds.append(inputs.hidden.new_zeros(0, inputs.hidden.shape[-1]))
        return MergeResult(keep, embeds, None)

    def select(self, inputs: StageInput, counts: list[int]) -> list[torch.Tensor] | torch.Tensor:
        return self.merge(inputs, counts).keep
