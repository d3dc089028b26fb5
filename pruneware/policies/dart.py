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
    pick other pivots;
  - exact ties in similarity go to the lowest index (official: `topk`'s order, unspecified).
The selection itself, text pivots included, runs in `pruneware.kernels.dart` (a Triton kernel on
CUDA, numpy on the CPU, the plain-torch reference beside them), for every image of the batch at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pruneware.kernels.dart import select as dart_select
from pruneware.policies.attention import AttentionPolicy
from pruneware.policies.base import StageInput, register_policy, split_budget
from pruneware.policies.needs import Needs


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

    def select(self, inputs: StageInput, counts: list[int]) -> list[torch.Tensor] | torch.Tensor:
        if inputs.attention is None or inputs.text is None or inputs.text.score is None:
            raise RuntimeError("dart needs key norms and text rows; the session did not provide them")
        text = inputs.text
        sizes = inputs.image_sizes()
        n = inputs.hidden.shape[1]
        if n and all(s == [n] for s in sizes) and len(set(counts)) == 1 and 0 < counts[0] < n:
            # One full image per sample and one budget: every image at once (one kernel call,
            # the text pivots included).
            return dart_select(inputs.hidden, inputs.attention, text.hidden, text.valid, text.score, counts[0],
                               self.pivot_image, self.pivot_text)
        out = []
        for b, image_sizes in enumerate(sizes):
            parts = []
            for image, k in enumerate(split_budget(image_sizes, counts[b])):
                members = (inputs.image_ids[b] == image).nonzero().squeeze(1)
                if k:
                    picked = dart_select(
                        inputs.hidden[b, members][None], inputs.attention[b, members][None], text.hidden[b : b + 1],
                        text.valid[b : b + 1], text.score[b : b + 1], min(k, members.numel()), self.pivot_image,
                        self.pivot_text,
                    )
                    parts.append(members[picked[0]])
            empty = torch.zeros(0, dtype=torch.long, device=inputs.hidden.device)
            out.append(torch.cat(parts).sort().values if parts else empty)
        return out
