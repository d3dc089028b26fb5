"""SparseVLM's text raters and token recycling in plain torch: the truth the other paths must equal.

The rule of the official code (Gumpest/SparseVLMs @ `26a5f48`, `llava/model/language_model/`:
`modelling_sparse_llama.py` for the raters and the recycling, `utils.py` for `cluster_and_merge`),
with pruneware's deliberate differences (see `pruneware.policies.sparsevlm`):
  - raters: with V a sample's visual rows and T its candidate text rows of the language model's
    input, m = softmax_T(V T^T) averaged over V; the raters are the rows with m above its mean;
  - recycling: of a sample's P pruned tokens (its first n slots minus the kept ones), the
    int(0.3 P) + 1 with the highest scores are clustered by DPC-kNN into int(M / 10) + 1 tokens
    (`cluster_and_merge`), which take the last pruned slots, in the order of the cluster centres.
Everything is computed in float32; merged states are cast back to the input dtype.
"""

from __future__ import annotations

import torch

RECYCLE_SHARE = 0.3  # official: `int(merge_token_idx_stage1.shape[0] * 0.3) + 1`, "Top 30%"
TOKENS_PER_CLUSTER = 10  # official: `cluster_num = int(merge_token_stage2.shape[1] / 10) + 1`


def rated_count(pruned: int) -> int:
    """Pruned tokens that are clustered (official: the top 30% plus one); none when nothing was pruned."""
    return int(pruned * RECYCLE_SHARE) + 1 if pruned > 0 else 0


def recycled_count(pruned: int) -> int:
    """Merged tokens made from `pruned` pruned tokens (none when nothing was pruned)."""
    if pruned <= 0:
        return 0
    return int(rated_count(pruned) / TOKENS_PER_CLUSTER) + 1


def validate_raters(embeds: torch.Tensor, visual: torch.Tensor, text: torch.Tensor) -> None:
    """Raise ValueError for inputs `text_raters` cannot take, naming the bad value."""
    if embeds.dim() != 3 or not embeds.is_floating_point():
        raise ValueError(f"embeds must be a float [B, L, D] tensor, got {embeds.dtype} {tuple(embeds.shape)}")
    for name, mask in (("visual", visual), ("text", text)):
        if mask.shape != embeds.shape[:2] or mask.dtype != torch.bool:
            raise ValueError(f"{name} must be [B, L] = {tuple(embeds.shape[:2])} bool, "
                             f"got {mask.dtype} {tuple(mask.shape)}")


def validate_recycle(
    hidden: torch.Tensor, scores: torch.Tensor, kept: list[torch.Tensor] | torch.Tensor, counts: list[int],
) -> None:
    """Raise ValueError for inputs `recycle` cannot take, naming the bad value (reads shapes only)."""
    if hidden.dim() != 3 or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a float [B, N, D] tensor, got {hidden.dtype} {tuple(hidden.shape)}")
    batch, n = hidden.shape[:2]
    if scores.shape != (batch, n):
        raise ValueError(f"scores must be [B, N] = {(batch, n)}, got {tuple(scores.shape)}")
    if len(kept) != batch or len(counts) != batch:
        raise ValueError(f"kept and counts need one entry per sample ({batch}), got {len(kept)} and {len(counts)}")
    for b, count in enumerate(counts):
        if not 0 <= count <= n:
            raise ValueError(f"counts[{b}]={count} is outside [0, N={n}]")
        size = kept.shape[1] if isinstance(kept, torch.Tensor) else kept[b].numel()
        if size > count:
            raise ValueError(f"sample {b} keeps {size} of its {count} tokens")


def text_raters(embeds: torch.Tensor, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the text slots that rate the visual tokens (SparseVLM's `t_token_idx`).

    embeds: [B, L, D] the language model's input embeddings; visual: [B, L] bool its visual
    slots; text: [B, L] bool the candidate text slots. A sample without either has no raters.
    """
    validate_raters(embeds, visual, text)
    out = torch.zeros_like(text)
    for b in range(embeds.shape[0]):
        if not visual[b].any() or not text[b].any():
            continue
        v, t = embeds[b, visual[b]].float(), embeds[b, text[b]].float()  # [Nv, D], [Nt, D]
        relevance = (v @ t.T).softmax(dim=1).mean(dim=0)  # [Nt]
        out[b, text[b].nonzero().squeeze(1)] = relevance > relevance.mean()
    return out


def cluster_and_merge(x: torch.Tensor, clusters: int) -> torch.Tensor:
    """[clusters, D] float32: the official DPC-kNN merge of x [M, D] (without its density noise)."""
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


def recycle(
    hidden: torch.Tensor, scores: torch.Tensor, kept: list[torch.Tensor] | torch.Tensor, counts: list[int],
    merge: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each sample's kept tokens plus its recycled ones: their slots and states.

    Args:
        hidden: ``[B, N, D]`` float visual states; sample b's tokens are its first ``counts[b]`` rows.
        scores: ``[B, N]`` float the rating of each token (higher: recycled first).
        kept: per sample, ``[k_b]`` int64 the slots kept by the top-k (in ``[0, counts[b])``), a
            list or a ``[B, k]`` tensor.
        counts: per sample, its visual tokens (known on the host).
        merge: False keeps the kept tokens only (`sparsevlm[recycle=false]`).

    Returns:
        per sample, the sorted slots ``[k_b + c_b]`` int64 and their states ``[k_b + c_b, D]``
        (the recycled ones merged, in hidden's dtype).
    """
    validate_recycle(hidden, scores, kept, counts)
    slots_out, states_out = [], []
    for b, (rows, n) in enumerate(zip(kept, counts, strict=True)):
        sample = hidden[b, :n]
        pruned_mask = torch.ones(n, dtype=torch.bool, device=hidden.device)
        pruned_mask[rows] = False
        pruned = pruned_mask.nonzero().squeeze(1)  # slot order
        states = sample.clone()
        slots = pruned[:0]
        if merge and pruned.numel():
            rated = scores[b, pruned].float().topk(rated_count(pruned.numel())).indices
            merged = cluster_and_merge(sample[pruned[rated]], recycled_count(pruned.numel()))
            slots = pruned[pruned.numel() - merged.shape[0]:]
            states[slots] = merged.to(states.dtype)
        index = torch.cat([rows.to(hidden.device), slots]).sort().values
        slots_out.append(index)
        states_out.append(states[index])
    return slots_out, states_out


def rater_scores(
    q: torch.Tensor, k: torch.Tensor, raters: torch.Tensor, run: slice, key_mask: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """[B, L] float32: SparseVLM's score of every key, the softmax attention the rater rows pay it,
    summed over heads and raters (`kernels.scores` with weight 1 per rater row).

    q: [B, H, T, d] the query rows, at slots run.start..L-1 (one run shared by every sample, each
    row causal); k: [B, Hkv, L, d]; raters: [B, T] bool, the rows that count (real tokens);
    key_mask: [B, L] bool real keys, or None."""
    from ..scores.reference import attention_scores

    slots = torch.arange(run.start, k.shape[2], device=q.device).expand(q.shape[0], -1)
    return attention_scores(q, k, raters.float(), query_positions=slots, key_mask=key_mask, scale=scale)[0]
