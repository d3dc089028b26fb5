"""`pdrop`: PyramidDrop's ranking: the last instruction token's attention at the stage's own layer.

Official code: github.com/Cooperx521/PyramidDrop, `llava/model/modeling_llama_pdrop.py`,
`LlamaModel.pdrop_forward` and `pdrop_rank_drop`. After decoder layer K-1 (`rank_layer =
layer_idx + 1` in `layer_list = [8, 16, 24]`), it runs layer K's `input_layernorm`, `q_proj` and
`k_proj` (with RoPE) on the unpruned hidden states, takes the softmax row of the last prompt
token (`prompt_total_len - 1`) over all keys, averages it over heads, and keeps the top
`int(n_image * ratio)` image tokens before layer K runs. pruneware does the same through a
*preview*: at the stage `pdrop@K`, the session runs layer K's attention projections on the
level's input (no cache update, the attention itself is not run) and scores the rows with the
shared score kernel, so layer K then computes on the kept tokens only.

Deliberate differences from the official code:
  - heads are summed in float32, not averaged after a cast to the model's dtype: the same order
    up to rounding ties;
  - the budget is pruneware's `round(ratio * n)` of the original count (official: `int()`); the
    two agree whenever `ratio * n` is whole, as on LLaVA-1.5's 576 tokens at 1/2, 1/4, 1/8;
  - several images per sample share the budget in proportion (official: the first image only);
    padded batches and `generate` with a cache work (official: right padding, batch of one at
    inference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pruneware.policies.attention import AttentionPolicy
from pruneware.policies.base import register_policy
from pruneware.policies.needs import Needs


@register_policy
@dataclass(frozen=True)
class PyramidDropPolicy(AttentionPolicy):
    name = "pdrop"
    needs: ClassVar[Needs] = Needs(attention="own")
    description = "PyramidDrop: last-instruction-token attention of layer K on its unpruned input, top-k at K."
