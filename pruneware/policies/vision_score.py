"""`vision-score`: a vision-side saliency score for pre-LLM pruning.

Each token is scored by how strongly a global query, the mean of its image's tokens, attends to
it: s_i = <x_i, mean(x)> / sqrt(D) (the softmax over i keeps the order, so top-k is on the logits).
This is a parameter-free stand-in for the [CLS] attention that FasterVLM / VisionZip read inside
the vision tower: vLLM's fused encoder attention does not expose attention rows. The vLLM plugin
feeds it the vision tower's features *before* the projector where the model has a separate
projector (LLaVA); Qwen2.5-VL's projector (the patch merger) is inside its vision tower, so there
it sees the merged tokens. Outside vLLM it scores whatever `hidden` it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pruneware.policies.base import Policy, StageInput, register_policy
from pruneware.policies.needs import Needs


@register_policy
@dataclass(frozen=True)
class VisionScorePolicy(Policy):
    name = "vision-score"
    description = "Vision-side saliency: attention of the image's mean token to each token, pre-LLM."
    needs: ClassVar[Needs] = Needs(vision_features=True)  # the vLLM plugin passes pre-projector features

    def score(self, inputs: StageInput) -> torch.Tensor:
        x = inputs.hidden if inputs.hidden.dtype == torch.float32 else inputs.hidden.float()  # [B, N, D]
        scale = x.shape[-1] ** -0.5
        sizes = inputs.image_sizes()  # on the host when the engine knows them: no sync
        n = x.shape[1]
        if n and all(s == [n] for s in sizes):  # one full image per sample: its row is the image, no mask
            # The arithmetic below for every sample at once: three ops, whatever the batch.
            return torch.einsum("bnd,bd->bn", x, x.mean(dim=1)).mul_(scale)
        scores = torch.zeros(inputs.valid.shape, dtype=torch.float32, device=x.device)
        for b, image_sizes in enumerate(sizes):
            ids = inputs.image_ids[b]
            for image, size in enumerate(image_sizes):
                if not size:
                    continue
                members = (ids == image) & inputs.valid[b]
                tokens = x[b, members]  # [n, D]
                scores[b, members] = tokens @ tokens.mean(dim=0) * scale
        return scores

