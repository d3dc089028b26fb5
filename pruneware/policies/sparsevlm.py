"""`sparsevlm`: SparseVLM's text raters, attention ranking and token recycling, as its official
code computes them (v1.0, the default `USE_VERSION`).

Official code: github.com/Gumpest/SparseVLMs @ `26a5f48`, `llava/model/language_model/`:
`modelling_sparse_llama.py` (`LlamaDynamicvitModel.forward`), `score.py`
(`attn_postprocess_topk`, `sparse_token_dict`) and `utils.py` (`cluster_and_merge`).

  1. Raters (once, on the language model's input embeddings): with V the visual tokens and T the
     text after the image (question and assistant prefix), m = softmax_T(V T^T) averaged over V;
     the raters are the text tokens with m above its mean (`t_token_idx`).
  2. Ranking, inside layer L in `pruning_loc = [2, 6, 15]` (pruneware: the stage `@L+1`, on the
     attention captured in layer L): the softmax attention of the rater rows over the visual
     tokens, averaged over heads and raters; keep the top min(count, n - 1) (`attn_postprocess_topk`).
  3. Recycling, on layer L's output: of the P pruned tokens, the int(0.3 P) + 1 the raters rate
     highest are clustered into int(M / 10) + 1 tokens by DPC-kNN (`cluster_and_merge`: local
     density from the k nearest of the distances ||x_i - x_j|| / sqrt(D), centres by density
     times distance to a denser token, each token to its nearest centre, the mean of each
     cluster); the rest are dropped. The merged tokens join the visual block and take part in
     the later stages like any visual token.
Positions are re-indexed in the official code (`position_ids[:, :kept]`): the preset uses
`compact` on 1-D RoPE models.

Deliberate differences from the official code:
  - **Where the merged tokens sit.** Official: right after the kept visual tokens, in the order
    of the cluster centres. pruneware's engine keeps a pruned sequence as a subset of the
    original slots, so each merged token takes one of the last pruned visual slots of the sample
    (in the same order). With `compact` positions this is the official sequence whenever no kept
    token comes after those slots (the usual case: most tokens are pruned); otherwise a kept
    token that comes later in the image stays after them. `report.stages[i].kept` lists these
    slots too (their original positions), and counts them as visual tokens.
  - The density noise (`torch.rand(...) * 1e-6`, unseeded, "to ensure no tokens have the same
    density") is left out: selection is reproducible; exact density ties then go to topk's order.
  - Raters, scores and merging are computed in float32 (official: the model's dtype), and heads
    and raters are summed rather than averaged (the same order: one positive factor per sample,
    so the top-k and the recycling's rating rank alike; the session passes only rater rows as
    valid, and the base class weighs each valid row 1: one op where the mean took four).
    Distances use `torch.cdist` without the matmul shortcut (official: the norm of an [M, M, D]
    difference tensor; the same values without materialising it).
  - Padded batches, several images per sample (the top-k budget split over images in
    proportion; raters and recycling over the sample's whole visual block) and `generate`
    with a cache work; the official code handles one sample (`mask[0][indices]`).
  - The official Qwen code does not exist: on M-RoPE models the same rule runs with positions kept.
  - `sparsevlm[recycle=false]` prunes without recycling (SparseVLM v2.0 also turns merging off).
The raters and the recycling run in `pruneware.kernels.sparsevlm` (one Triton launch each on
CUDA, numpy on the CPU, the plain-torch reference beside them), for the whole batch at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pruneware.kernels.sparsevlm import rater_scores, recycle, recycled_count, text_raters
from pruneware.kernels.sparsevlm.reference import RECYCLE_SHARE, TOKENS_PER_CLUSTER, cluster_and_merge
from pruneware.policies.attention import AttentionPolicy
from pruneware.policies.base import MergeResult, StageInput, register_policy, topk_per_image
from pruneware.policies.needs import Needs

# The rule's constants and its clustering step live with the fused kernels; re-exported here.
__all__ = ["RECYCLE_SHARE", "TOKENS_PER_CLUSTER", "SparseVLMPolicy", "cluster_and_merge", "recycled_count",
           "tokens_after"]


def tokens_after(received: int, count: int) -> int:
    """Visual tokens leaving a stage that receives `received` and keeps `count` (official:
    at most received - 1, so that something is always recycled), merged tokens included."""
    if received <= 0:
        return 0
    kept = min(count, received - 1)
    return kept + recycled_count(received - kept)


@register_policy
@dataclass(frozen=True)
class SparseVLMPolicy(AttentionPolicy):
    name = "sparsevlm"
    needs: ClassVar[Needs] = Needs(attention="previous", query="post-image", raters=True, output="recycle")
    description = "SparseVLM: attention of the image-relevant text raters at layer K-1, pruned tokens recycled."
    recycle: bool = True

    def raters(self, embeds: torch.Tensor, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """[B, L] bool rater slots of embeds [B, L, D] among the text slots [B, L] (one fused call)."""
        return text_raters(embeds, visual, text)

    def fused_attention_scores(
        self, q_rows: torch.Tensor, key: torch.Tensor, row_valid: torch.Tensor, query_positions: torch.Tensor | None,
        key_mask: torch.Tensor | None, scale: float | None, query_run: slice | None,
    ) -> torch.Tensor | None:
        """The rater rows' score in one kernel call when they are one run of slots (`kernels.sparsevlm.
        rater_scores`: the score kernel's numbers, the causal mask a table made once per shape)."""
        if query_run is None:
            return None
        return rater_scores(q_rows, key, row_valid, query_run, key_mask, scale)

    def merge(self, inputs: StageInput, counts: list[int]) -> MergeResult:
        """Per sample: the kept visual tokens plus the slots of the recycled ones, and their states.

        The top-k is one batched call (`topk_per_image`; unsorted for one image per sample); the
        recycling (pruned set, rating, DPC-kNN clustering, merged states, the sorted slots) is one
        fused call for the batch (`kernels.sparsevlm`). Token counts come from the host-side
        layout: no sync."""
        scores = self.score(inputs)  # [B, N] float32
        sizes = inputs.token_counts()
        budgets = [min(c, max(n - 1, 0)) for c, n in zip(counts, sizes, strict=True)]
        ranked = scores if inputs.all_valid() else scores.masked_fill(~inputs.valid, float("-inf"))
        if all(len(s) <= 1 for s in inputs.image_sizes()) and len(set(budgets)) == 1 and budgets[0] > 0:
            # One image per sample, one budget: one batched top-k, unsorted (`recycle` sorts the slots).
            chosen = ranked.topk(min(budgets[0], ranked.shape[1]), dim=1).indices
        else:
            chosen = topk_per_image(ranked, inputs, budgets)
        keep, embeds = recycle(inputs.hidden, scores, chosen, sizes, self.recycle)
        return MergeResult(keep, embeds, None)
