"""`dart`: duplication-aware pruning (DART): keep the visual tokens least similar to a few pivots.

Official code: github.com/ZichenWen1/DART, `llava/model/language_model/modeling_llama_self.py`
(`get_retained_image_token`, `DART_K_norm.forward`); the stage runs before decoder layer K = 2
(`--pruned_layer 2`). Read from a public fork of it (xqy1111111/DART): the official repository
could not be fetched in the session that wrote this.

Before layer K, with the keys layer K-1 just computed (post-RoPE, every key head):
  1. pivots: the `pivot_image` visual tokens and the `pivot_text` text tokens after the image
     with the largest L1 key norm;
  2. on the hidden states entering layer K, passed through the language model's final norm, each
     pivot in turn takes the tokens least cosine-similar to it among the visual tokens not yet
     taken (image pivots are taken from the start);
  3. the image pivots and every token a pivot took are kept; text pivots stay text.
Positions are kept (`position_ids = keep_indexs`).

Deliberate differences from the official code:
  - the budget is the number kept: each pivot takes `(k - p_img) // (p_img + p_txt)` tokens and
    the first `(k - p_img) % (p_img + p_txt)` pivots one more. The official `max_num_trunction=M`
    gives each pivot `M // (p_img + p_txt)`, so it keeps `p_img + 8 * (M // 8)` tokens with the
    default 4 + 4 pivots: `dart@2:132` is the official 128 setting;
  - pivots take their turns in position order; the official loop iterates a Python `set` of
    absolute positions, whose order follows CPython's hash table, not the sequence;
  - with several images each image gets its share of the budget and its own image pivots; the
    text pivots are shared (the official code handles one image, sample 0 of a batch);
  - a budget below `pivot_image` keeps the top key-norm image tokens only; too few text tokens
    give fewer text pivots (the official code would fail in topk);
  - key norms are summed in float32 (official: the model's dtype), so 16-bit near-ties can
    pick other pivots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pruneware.policies.attention import AttentionPolicy
from pruneware.policies.base import StageInput, register_policy, split_budget
from pruneware.policies.needs import Needs


def duplication_aware(
    visual: torch.Tensor, visual_norm: torch.Tensor, text_pivots: torch.Tensor, k: int, pivot_image: int
) -> torch.Tensor:
    """DART's selection for one image. visual: [n, D] normed states; visual_norm: [n] key L1
    norms; text_pivots: [p, D] normed states of the text pivots, in position order. Returns the
    kept indices into the n visual tokens, sorted."""
    n = visual.shape[0]
    if k >= n:
        return torch.arange(n, device=visual.device)
    p_img = min(pivot_image, k)
    image_pivots = visual_norm.topk(p_img).indices.sort().values
    free = torch.ones(n, dtype=torch.bool, device=visual.device)
    free[image_pivots] = False
    pivots = torch.cat([visual[image_pivots], text_pivots])  # image tokens precede the text after them
    share, extra = divmod(k - p_img, max(1, pivots.shape[0]))
    kept = [image_pivots]
    for i, pivot in enumerate(pivots):
        take = min(share + (i < extra), int(free.sum()))
        if take == 0:
            continue
        candidates = free.nonzero().squeeze(1)
        similarity = torch.nn.functional.cosine_similarity(pivot[None], visual[candidates], dim=-1)
        picked = candidates[(-similarity).topk(take).indices]
        free[picked] = False
        kept.append(picked)
    return torch.cat(kept).sort().values


@register_policy
@dataclass(frozen=True)
class DARTPolicy(AttentionPolicy):
    name = "dart"
    needs: ClassVar[Needs] = Needs(
        attention="previous", captures="key-norm", query="post-image", text=True, final_norm=True,
    )
    description = "DART: pivots by key L1 norm at layer K-1; keep the visual tokens least similar to them."
    pivot_image: int = 4
    pivot_text: int = 4

    def __post_init__(self) -> None:
        for field_name in ("pivot_image", "pivot_text"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value < 0:
                raise TypeError(f"{field_name} must be an integer >= 0, got {value!r}")
        if self.pivot_image + self.pivot_text == 0:
            raise TypeError("dart needs at least one pivot: pivot_image + pivot_text >= 1")

    def select(self, inputs: StageInput, counts: list[int]) -> list[torch.Tensor]:
        if inputs.attention is None or inputs.text is None:
            raise RuntimeError("dart needs key norms and text rows; the session did not provide them")
        text = inputs.text
        out = []
        for b, sizes in enumerate(inputs.image_sizes()):
            norms = text.score[b, text.valid[b]]
            p_txt = min(self.pivot_text, norms.numel())
            order = norms.topk(p_txt).indices.sort().values  # rows are in position order
            text_pivots = text.hidden[b, text.valid[b]][order]
            parts = []
            for image, k in enumerate(split_budget(sizes, counts[b])):
                members = (inputs.image_ids[b] == image).nonzero().squeeze(1)
                if k:
                    picked = duplication_aware(
                        inputs.hidden[b, members], inputs.attention[b, members], text_pivots, k, self.pivot_image
                    )
                    parts.append(members[picked])
            empty = torch.zeros(0, dtype=torch.long, device=norms.device)
            out.append(torch.cat(parts).sort().values if parts else empty)
        return out
