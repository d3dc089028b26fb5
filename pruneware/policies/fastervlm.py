"""`fastervlm`: keep the patches the vision tower's [CLS] token attends to most (FasterVLM).

Official code (Theia-4869/FasterVLM, `clip_encoder.py` / `llava_arch.py`): the CLIP tower runs
with `output_attentions=True`; the score is `attentions[select_layer][:, :, 0, 1:]` (the [CLS]
row at the layer the features come from, -2 on LLaVA-1.5) averaged over heads, and each image
keeps its top-k patches in their original order, before the LLM.

Here:
  - LLaVA: the same [CLS] row, at the layer `vision_feature_layer` reads, averaged over
    heads. It is computed from the tower's own q and k through pruneware's attention capture
    and the scores kernel, so the tower keeps its sdpa or flash attention and no attention
    matrix is built (the official code forces eager attention for every layer).
  - Qwen2-VL / Qwen2.5-VL (no [CLS]): the attention each patch receives, averaged over every
    query patch of its image and over heads, at the last full-attention ViT block, then
    averaged over the merge group of patches that makes one visual token. FasterVLM has no
    Qwen code; this is the usual vision-side score there (VisPruner, CDPruner).
Deliberate differences: the budget is per sample and split over its images in proportion (the
official code keeps the same k per image; equal for same-size images); kept tokens keep their
original positions unless the stage says `compact` (the official code re-packs them, which is
`compact`). Images only: a Qwen video has no per-frame reading here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pruneware.policies.base import Policy, StageInput, register_policy
from pruneware.policies.needs import Needs


def vision_scores(inputs: StageInput, name: str) -> torch.Tensor:
    """[B, N] the tower's per-token score, or a clear error when the session gave none."""
    if inputs.vision_scores is None:
        raise RuntimeError(
            f"{name} reads the vision tower's attention: run it as a 'pre' stage inside a pruneware "
            "session, with the pixels encoded inside that session"
        )
    return inputs.vision_scores


@register_policy
@dataclass(frozen=True)
class FasterVLMPolicy(Policy):
    name = "fastervlm"
    description = "FasterVLM: top [CLS] attention at the vision feature layer (Qwen: mean attention received), pre-LLM."
    needs: ClassVar[Needs] = Needs(vision=("attention",))

    def score(self, inputs: StageInput) -> torch.Tensor:
        return vision_scores(inputs, self.name)
