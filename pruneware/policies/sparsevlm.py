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
    are summed rather than averaged (the same order). Distances use `torch.cdist` without the
    matmul shortcut (official: the norm of an [M, M, D] difference tensor; the same values
    without materialising it).
  - Padded batches, several images per sample (the top-k budget split over images in
    proportion; raters and recycling over the sample's whole visual block) and `generate`
    with a cache work; the official code handles one sample (`mask[0][indices]`).
  - The official Qwen code does not exist: on M-RoPE models the same rule runs with positions kept.
  - `sparsevlm[recycle=false]` prunes without recycling (SparseVLM v2.0 also turns merging off).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pruneware.policies.attention import AttentionPolicy
from pruneware.policies.base import MergeResult, StageInput, register_policy, topk_per_image
from pruneware.policies.needs import Needs

RECYCLE_SHARE = 0.3  # official: `int(merge_token_idx_stage1.shape[0] * 0.3) + 1`, "Top 30%"
TOKENS_PER_CLUSTER = 10  # official: `cluster_num = int(merge_token_stage2.shape[1] / 10) + 1`


def recycled_count(pruned: int) -> int:
    """Merged tokens made from `pruned` pruned tokens (none when nothing was pruned)."""
    if pruned <= 0:
        return 0
    return int((int(pruned * RECYCLE_SHARE) + 1) / TOKENS_PER_CLUSTER) + 1


def tokens_after(received: int, count: int) -> int:
    """Visual tokens leaving a stage that receives `received` and keeps `count` (official:
    at most received - 1, so that something is always recycled), merged tokens included."""
    if received <= 0:
        return 0
    kept = min(count, received - 1)
    return kept + recycled_count(received - kept)


def raters(embeds: torch.Tensor, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the text slots that rate the visual tokens (SparseVLM's `t_token_idx`).

    embeds: [B, L, D] the language model's input embeddings; visual: [B, L] bool its visual
    slots; text: [B, L] bool the candidate text slots (the real text after the last visual slot).
    """
    out = torch.zeros_like(text)
    for b in range(embeds.shape[0]):
        if not visual[b].any() or not text[b].any():
            continue
        v, t = embeds[b, visual[b]].float(), embeds[b, text[b]].float()  # [Nv, D], [Nt, D]
        relevance = (v @ t.T).softmax(dim=1).mean(dim=0)  # [Nt]
        out[b, text[b].nonzero().squeeze(1)] = relevance > relevance.mean()
    return out


def cluster_and_merge(x: torch.Tensor, clusters: int) -> torch.Tensor:
    """[clusters, D]: the official DPC-kNN merge of x [M, D] (without its density noise)."""
    x = x.float()
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / x.shape[1] ** 0.5  # [M, M]
    nearest = dist.topk(clusters, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()  # [M]
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    parent = torch.where(denser, dist, dist.max()).min(dim=-1).values
    centres = (parent * density).topk(clusters).indices  # [clusters]
    assign = dist[centres].argmin(dim=0)  # [M] nearest centre
    assign[centres] = torch.arange(clusters, device=x.device)
    sizes = torch.zeros(clusters, device=x.device).index_add_(0, assign, torch.ones_like(assign, dtype=x.dtype))
    weights = 1.0 / (sizes + 1e-6)  # official: token_weight / (all_weight + 1e-6)
    return torch.zeros(clusters, x.shape[1], device=x.device).index_add_(0, assign, x * weights[assign, None])


@register_policy
@dataclass(frozen=True)
class SparseVLMPolicy(AttentionPolicy):
    name = "sparsevlm"
    needs: ClassVar[Needs] = Needs(attention="previous", query="post-image", raters=True, output="recycle")
    description = "SparseVLM: attention of the image-relevant text raters at layer K-1, pruned tokens recycled."
    recycle: bool = True

    def raters(self, embeds: torch.Tensor, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return raters(embeds, visual, text)

    def row_weights(self, query_block: torch.Tensor | None, row_valid: torch.Tensor) -> torch.Tensor:
        """The mean over the raters (the session passes only rater rows as valid)."""
        valid = row_valid.float()
        return valid / valid.sum(dim=1, keepdim=True).clamp(min=1.0)

    def merge(self, inputs: StageInput, counts: list[int]) -> MergeResult:
        """Per sample: the kept visual tokens plus the slots of the recycled ones, and their states."""
        scores = self.score(inputs).float().masked_fill(~inputs.valid, float("-inf"))
        sizes = inputs.valid.sum(dim=1).tolist()
        budgets = [min(c, max(n - 1, 0)) for c, n in zip(counts, sizes, strict=True)]
        chosen = topk_per_image(scores, inputs, budgets)
        keep, embeds = [], []
        for b, (kept, n) in enumerate(zip(chosen, sizes, strict=True)):
            hidden = inputs.hidden[b, :n]
            pruned_mask = torch.ones(n, dtype=torch.bool, device=hidden.device)
            pruned_mask[kept] = False
            pruned = pruned_mask.nonzero().squeeze(1)  # slot order
            states = hidden.clone()
            slots = pruned[:0]
            if self.recycle and pruned.numel():
                rated = scores[b, pruned].topk(int(pruned.numel() * RECYCLE_SHARE) + 1).indices
                merged = cluster_and_merge(hidden[pruned[rated]], recycled_count(pruned.numel()))
                slots = pruned[pruned.numel() - merged.shape[0]:]
                states[slots] = merged.to(states.dtype)
            index = torch.cat([kept.to(hidden.device), slots]).sort().values
            keep.append(index)
            embeds.append(states[index])
        return MergeResult(keep, embeds, None)
