"""Attention-scored in-LLM stages in vLLM (`fastv@K`, `pdrop@K`): which visual rows a stage keeps,
decided in the step from the attention the last prompt token pays at layer K-1 (FastV) or at
layer K on its unpruned input (PyramidDrop, `Needs.attention == "own"`).

vLLM's fused attention kernels return no weights, so the stage reads the queries and keys of
layer K-1 as that layer computed them (after RoPE: a forward hook on its rotary embedding), or
previews layer K's (its input norm, QKV projection and RoPE on copies of its input), and
recomputes one softmax row per request: the last prompt token against every key of its prompt,
summed over heads (over every tensor-parallel rank), as pruneware's HF capture scores them.
That needs the whole prompt in the step: the plugin refuses chunked prefill for such plans.
This module imports vllm only inside functions.
"""

from __future__ import annotations

from typing import Any

import torch

from pruneware.plans.plan import Stage
from pruneware.policies import get_policy


def scored_needs(needs: Any) -> bool:
    """Whether a policy with these `Needs` is scored in the step: a selection by the attention the
    last token pays at layer K-1, and nothing else (FastV)."""
    return needs.states and needs.attention in ("previous", "own") and needs.query == "last" and not (
        needs.query_block or needs.raters or needs.text or needs.final_norm or needs.captures != "attention"
        or needs.output != "select"
    )


def scored_in_llm(stage: Stage) -> bool:
    """Whether the plugin runs `stage` (an in-LLM stage) by scoring it in the step."""
    return scored_needs(get_policy(stage.policy).needs)


def last_row_attention(q: torch.Tensor, k: torch.Tensor, query_start_loc: torch.Tensor, heads: int, kv_heads: int,
                       head_size: int, scale: float, requests: list[int]) -> dict[int, torch.Tensor]:
    """For each request r in `requests`: [n_r] the attention its last row pays each of its rows,
    summed over this rank's heads (softmax over the request's rows; the last row sees them all).

    q: [N, heads * head_size], k: [N, kv_heads * head_size] after RoPE; query_start_loc: [R + 1].
    """
    out: dict[int, torch.Tensor] = {}
    group = heads // kv_heads
    for r in requests:
        start, end = int(query_start_loc[r]), int(query_start_loc[r + 1])
        query = q[end - 1].view(heads, head_size).float()
        keys = k[start:end].view(end - start, kv_heads, head_size).float().repeat_interleave(group, dim=1)
        logits = torch.einsum("hd,nhd->hn", query, keys) * scale
        out[r] = torch.softmax(logits, dim=-1).sum(0)
    return out


def all_reduce_heads(scores: torch.Tensor) -> torch.Tensor:
    """Sum per-rank head sums over the tensor-parallel group (a no-op at TP=1)."""
    from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce

    return tensor_model_parallel_all_reduce(scores) if get_tensor_model_parallel_world_size() > 1 else scores


def choose_dropped(stage: Stage, level: int, scores: dict[int, torch.Tensor], query_start_loc: torch.Tensor,
                   visual: torch.Tensor, original: torch.Tensor, rows: torch.Tensor, levels: torch.Tensor) -> None:
    """Mark in `levels` ([N] per step row) the visual rows stage `level` drops, per request: it keeps
    `stage.keep_count(original, alive)` of its alive visual rows, the top-scored ones.

    visual: [n] bool, the current rows that are visual; original: [n] each visual row's item
    token count before any pruning; rows: [n] each current row's index among the step's rows.
    """
    for r, score in scores.items():
        start, end = int(query_start_loc[r]), int(query_start_loc[r + 1])
        mask = visual[start:end]
        alive = int(mask.sum())
        if alive == 0:
            continue
        n_original = int(original[start:end][mask].max())
        keep = min(alive, stage.keep_count(n_original, alive))
        if keep == alive:
            continue
        candidates = torch.nonzero(mask).squeeze(1)
        top = torch.topk(score.reshape(-1)[candidates], keep).indices
        dropped = torch.ones(alive, dtype=torch.bool, device=mask.device)
        dropped[top] = False
        levels[rows[start + candidates[dropped]]] = level


def preview_qk(layer: Any, positions: torch.Tensor, hidden: torch.Tensor,
               residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) after RoPE that vLLM decoder `layer` (Llama/Qwen2 structure) computes on this input,
    without running it: its input norm (fused with the residual add) on copies, QKV, RoPE."""
    norm = layer.input_layernorm
    normed = norm(hidden.clone()) if residual is None else norm(hidden.clone(), residual.clone())[0]
    attn = layer.self_attn
    qkv, _ = attn.qkv_proj(normed)
    q, k, _ = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    return attn.rotary_emb(positions, q, k)


def attention_shape(layer: Any) -> tuple[int, int, int, float]:
    """(heads, kv_heads, head_size, scale) of a vLLM decoder layer's attention on this rank."""
    attn = layer.self_attn.attn
    return attn.num_heads, attn.num_kv_heads, attn.head_size, float(getattr(layer.self_attn, "scaling", attn.head_size ** -0.5))
