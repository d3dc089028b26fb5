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
The budget is per sample and split over its images in proportion. Images only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch

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


@lru_cache(maxsize=64)
def _rest_order(m: int, count: int, device: torch.device) -> torch.Tensor:
    """[m]: `contextual_merge`'s targets among m non-dominant tokens, then the others, in order."""
    targets = list(range(0, m, max(1, m // count)))[:count]
    chosen = set(targets)
    return torch.tensor(targets + [i for i in range(m) if i not in chosen], device=device)


def batched_merge(
    hidden: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, budget: int, share: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip on B images of n tokens each, all at once (one op per step for the whole batch,
    not per image): the rule of `merge`'s loop and `contextual_merge`.

    hidden: [B, n, D]; scores: [B, n]; keys: [B, n, d]; 0 < budget < n. Returns the kept slots
    [B, budget] (sorted) and their states [B, budget, D].
    """
    batch, n, _ = hidden.shape
    n_dominant = max(1, min(budget, round(budget * share)))
    count, m = budget - n_dominant, n - n_dominant
    dominant = torch.zeros(batch, n, dtype=torch.int8, device=hidden.device)
    dominant.scatter_(1, scores.topk(n_dominant, dim=1).indices, 1)
    order = torch.sort(dominant, dim=1, stable=True).indices  # [B, n]: the others in order, then the dominant
    if count == 0:
        slots = order[:, m:]
        return slots, torch.take_along_dim(hidden, slots.unsqueeze(-1), dim=1)
    rest = order[:, _rest_order(m, count, hidden.device)]  # [B, m]: targets first, then the tokens to merge
    unit = torch.take_along_dim(keys, rest.unsqueeze(-1), dim=1)
    unit = unit / unit.norm(dim=-1, keepdim=True)
    assign = torch.matmul(unit[:, count:], unit[:, :count].transpose(1, 2)).argmax(dim=2)  # [B, m - count]
    one_hot = torch.nn.functional.one_hot(assign, count).to(torch.float32)  # [B, m - count, count]
    rows = torch.take_along_dim(hidden, rest.unsqueeze(-1), dim=1).float()  # [B, m, D]
    merged = torch.matmul(one_hot.transpose(1, 2), rows[:, count:]) / one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    contextual = (rows[:, :count] + merged).to(hidden.dtype)
    slots, by_slot = torch.cat([order[:, m:], rest[:, :count]], dim=1).sort(dim=1)
    states = torch.cat([torch.take_along_dim(hidden, order[:, m:].unsqueeze(-1), dim=1), contextual], dim=1)
    return slots, torch.take_along_dim(states, by_slot.unsqueeze(-1), dim=1)


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
