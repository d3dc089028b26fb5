"""The official AdaptInfer selection, rebuilt from eager attention probabilities, without pruneware.

This transcribes github.com/weiczh02/AdaptInfer-base as closely as a test can:
- `llava/model/language_model/score.py` and `qwen2_vl/SparseQwen/score.py`,
  `attn_postprocess_topk_with_t2t_weighting`: the scoring rule and k, line by line;
- `modelling_sparse_llama.py` (LLaVA) and `qwen2_vl/SparseQwen/builder.py` (Qwen2-VL): the layer
  loop. At each layer in `pruning_loc`, the layer runs, its attention probabilities [1, H, L, L]
  are read (here: transformers' eager attention weights, from a hook on `self_attn`), and the
  layer's *output* keeps the text plus the top-k visual tokens. LLaVA then re-indexes positions
  (`position_ids[:, :kept]`); Qwen2-VL keeps each token's M-RoPE position.
The official code runs one sample at a time; so does this reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.masking_utils import create_causal_mask

from tests.reference import record_lm_inputs
from tests.tiny import IMAGE_TOKEN, VIDEO_TOKEN


def official_scores(attn: torch.Tensor, v_start: int, v_num: int, text_start: int) -> torch.Tensor:
    """score.py, lb = 1: attn [B, H, L, L] probabilities -> visual scores [B, V]."""
    t2t = attn[:, :, text_start:, text_start:]  # [B, H, T, T]
    t2t_transpose = t2t.transpose(-1, -2)
    diag = torch.diagonal(t2t, dim1=-2, dim2=-1)  # [B, H, T]
    t2t_2 = t2t + t2t_transpose - torch.diag_embed(diag)
    text_importance = t2t_2.sum(dim=2)  # [B, H, T]
    t2v = attn[:, :, text_start:, v_start:v_start + v_num]  # [B, H, T, V]
    visual_scores = text_importance.unsqueeze(-2) @ t2v  # [B, H, 1, V]
    return visual_scores.squeeze(-2).sum(dim=1)  # [B, V]


def llava_k(counts: list[int]) -> Callable[[int, int], int]:
    """score.py (LLaVA): k = min(sparse_list[stage], v_token_num - 1)."""
    return lambda stage, v_num: min(counts[stage], v_num - 1)


def qwen_k(ratios: list[float]) -> Callable[[int, int], int]:
    """SparseQwen/score.py: k = min(int(ratio * v_token_num), v_token_num - 1); v_token_num is an
    int64 tensor, so the product is float32."""
    return lambda stage, v_num: min(int(ratios[stage] * torch.tensor(v_num)), v_num - 1)


@torch.no_grad()
def official_kept(
    model, inputs: dict, pruning_loc: list[int], k_of: Callable[[int, int], int], compact: bool
) -> list[torch.Tensor]:
    """Original positions of the visual tokens kept after each layer of `pruning_loc`, for a
    single unpadded sample. `model` must use eager attention (its layers return probabilities)."""
    assert inputs["input_ids"].shape[0] == 1
    seen = record_lm_inputs(model, inputs)
    lm = model.model.language_model
    hidden = seen["embeds"]
    length = hidden.shape[1]
    positions = seen["positions"] if seen["positions"] is not None else torch.arange(length)[None]
    if positions.dim() == 3 and positions.shape[0] == 4:
        positions = positions[1:]
    ids = inputs["input_ids"][0]
    visual0 = (ids == IMAGE_TOKEN) | (ids == VIDEO_TOKEN)
    origin = torch.arange(length)
    captured: dict[str, torch.Tensor] = {}
    kept = []
    for i, layer in enumerate(lm.layers):
        cos_sin = lm.rotary_emb(hidden, positions)
        mask = create_causal_mask(
            config=lm.config, inputs_embeds=hidden, attention_mask=torch.ones(1, hidden.shape[1], dtype=torch.long),
            cache=None,
        )
        handle = layer.self_attn.register_forward_hook(lambda m, a, out: captured.update(attn=out[1]))
        try:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=cos_sin, position_ids=None)
        finally:
            handle.remove()
        if i not in pruning_loc:
            continue
        attn = captured["attn"].float()
        visual = visual0[origin]
        v_num = int(visual.sum())
        v_start = int(visual.nonzero()[0]) if v_num else 0
        text_start = v_start + v_num  # the official code: vision tokens are one contiguous block
        keep = torch.ones(hidden.shape[1], dtype=torch.bool)
        keep[v_start:text_start] = False
        k = k_of(pruning_loc.index(i), v_num) if v_num else 0
        if k > 0:
            scores = official_scores(attn, v_start, v_num, text_start)
            keep[v_start + torch.topk(scores, k=k, dim=1).indices[0]] = True
        hidden, origin = hidden[:, keep], origin[keep]
        positions = torch.arange(hidden.shape[1])[None] if compact else positions[..., keep]
        kept.append(origin[visual0[origin]])
    return kept


def official_divprune(visual_feature_vectors: torch.Tensor, threshold_ratio: float) -> torch.Tensor:
    """vbdi/divprune `LLaVA/llava/model/llava_arch.py` `DivPrune`: [N, D] features -> picked indices."""
    threshold_terms = int(round(threshold_ratio * visual_feature_vectors.shape[0]))
    norm_matrix = visual_feature_vectors / visual_feature_vectors.norm(dim=1, keepdim=True)
    cosine_matrix = 1.0 - torch.mm(norm_matrix, norm_matrix.t())
    s = torch.empty(threshold_terms, dtype=torch.long)
    for i in range(threshold_terms):
        if i == 0:
            scores = torch.topk(cosine_matrix, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(torch.index_select(cosine_matrix, 0, s[:i]), dim=0).values
        s[i] = torch.argmax(scores)
    return s


@torch.no_grad()
def official_pdrop_kept(model, inputs: dict, layer_list: list[int], ratios: list[float]) -> list[torch.Tensor]:
    """Cooperx521/PyramidDrop `modeling_llama_pdrop.py` (`pdrop_forward`, `pdrop_rank_drop`), at
    inference, for one unpadded sample with one image: original positions of the image tokens
    kept at each rank layer.

    After layer `rank_layer - 1`, layer `rank_layer`'s input_layernorm, q/k projections and RoPE
    run on the unpruned hidden states; the last prompt token's softmax row, averaged over heads,
    ranks the image tokens; the top `int(n_image * ratio)` stay, and positions are re-numbered
    0..n-1 (`position_ids[i, :cur_len] = arange(cur_len)`). Here the row is read from
    transformers' eager attention weights of that layer, run on the same input.
    """
    assert inputs["input_ids"].shape[0] == 1
    seen = record_lm_inputs(model, inputs)
    lm = model.model.language_model
    hidden = seen["embeds"]
    positions = torch.arange(hidden.shape[1])[None]
    ids = inputs["input_ids"][0]
    image0 = ids == IMAGE_TOKEN
    n_image = int(image0.sum())
    ratio_list = [1.0, *ratios]  # model_vqa_loader.py: image_token_ratio_list.insert(0, 1.0)
    origin = torch.arange(hidden.shape[1])
    kept = []

    def layer_inputs(hidden, positions):
        cos_sin = lm.rotary_emb(hidden, positions)
        mask = create_causal_mask(
            config=lm.config, inputs_embeds=hidden, attention_mask=torch.ones(1, hidden.shape[1], dtype=torch.long),
            cache=None,
        )
        return cos_sin, mask

    for i, layer in enumerate(lm.layers):
        if i in layer_list:
            stage = layer_list.index(i)
            image_tokens = int(n_image * ratio_list[stage])
            keep_length = int(n_image * ratio_list[stage + 1])
            cos_sin, mask = layer_inputs(hidden, positions)
            _, attn = layer.self_attn(layer.input_layernorm(hidden), position_embeddings=cos_sin, attention_mask=mask)
            image = image0[origin]
            image_index = int(image.nonzero()[0])
            row = attn[0, :, -1, :].float().mean(dim=0)  # the last prompt token, averaged over heads
            top = row[image_index:image_index + image_tokens].topk(keep_length).indices + image_index
            keep = ~image
            keep[top] = True
            hidden, origin = hidden[:, keep], origin[keep]
            positions = torch.arange(hidden.shape[1])[None]
            kept.append(origin[image0[origin]])
        cos_sin, mask = layer_inputs(hidden, positions)
        hidden = layer(hidden, attention_mask=mask, position_embeddings=cos_sin, position_ids=None)
    return kept


def official_dart_core(
    last_layer_state: torch.Tensor, k_states: torch.Tensor, image: list[int], query: list[int],
    pivot_image_token: int, pivot_text_token: int, token_topk: int,
) -> list[int]:
    """ZichenWen1/DART `get_retained_image_token` (LLaVA), line by line, for one sample:
    last_layer_state [L, D] normed states entering layer K; k_states [L, Hkv*d] layer K-1's keys
    (post-RoPE, heads flattened); image, query: absolute positions of the image block and of the
    text after it. Returns the kept image positions.

    One line differs: the official `for item in list(tmp_set)` walks a Python set in hash-table
    order; this walks it in position order, as pruneware does (see pruneware/policies/dart.py).
    """
    image_t, query_t = torch.tensor(image), torch.tensor(query)
    k_states_image_token_L1_norm = torch.norm(k_states[image_t], p=1, dim=-1)
    k_states_query_token_L1_norm = torch.norm(k_states[query_t], p=1, dim=-1)
    image_indices = image_t[k_states_image_token_L1_norm.topk(pivot_image_token).indices].tolist()
    query_indices = query_t[k_states_query_token_L1_norm.topk(pivot_text_token).indices].tolist()
    indices_set = set(image_indices + query_indices)
    tmp_set = indices_set.copy()
    valid_indices = set(image)
    valid_indices.difference_update(image_indices)
    for item in sorted(tmp_set):
        valid_indices_list = sorted(valid_indices)
        valid_vectors = last_layer_state[valid_indices_list, :]
        cos_sim = -torch.nn.functional.cosine_similarity(last_layer_state[item, :], valid_vectors, dim=-1)
        top_k_indices = cos_sim.topk(token_topk).indices
        top_k_real_indices = [valid_indices_list[i] for i in top_k_indices.tolist()]
        indices_set.update(top_k_real_indices)
        valid_indices.difference_update(top_k_real_indices)
    indices_set.difference_update(query_indices)
    return sorted(indices_set)


@torch.no_grad()
def dart_inputs(model, inputs: dict, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From an unpruned forward of one sample: the states entering `layer` through the final norm
    [L, D], and layer `layer - 1`'s cached keys with heads flattened [L, Hkv*d]."""
    out = model(**inputs, output_hidden_states=True, use_cache=True)
    lm = model.model.language_model
    states = lm.norm(out.hidden_states[layer][0])
    keys = out.past_key_values.layers[layer - 1].keys[0]  # [Hkv, L, d], post-RoPE
    return states, keys.permute(1, 0, 2).reshape(keys.shape[1], -1)


def official_cdpruner(
    image_features: torch.Tensor, image_embeds: torch.Tensor, text_embeds: torch.Tensor, visual_token_num: int,
) -> torch.Tensor:
    """CDPruner's `encode_images` (Theia-4869/CDPruner, `llava/model/llava_arch.py`) after the
    projector, line by line: image_features [B, N, D] (projected), image_embeds [B, N, C] and
    text_embeds [M, C] (the relevance inputs) -> index_masks [B, N] bool."""
    B, N, C = image_features.shape
    device = image_features.device
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)  # (B, N, D)
    image_normalized = image_normalized.float()  # (B, N, D)
    similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))  # (B, N, N)
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)  # (B, N, C)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)  # (M, C)
    relevance = torch.matmul(image_embeds, text_embeds.t())  # (B, N, M)
    relevance = (-relevance).mean(dim=-1)  # (B, N)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())  # (B, N)
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)  # (B, N, N)
    cis = torch.zeros((visual_token_num, B, N), device=device)  # (T, B, N)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # (B, N)
    select_idx = torch.empty((visual_token_num, B), dtype=torch.long, device=device)  # (T, B)
    for i in range(visual_token_num):
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j
        eis = (kernel[torch.arange(B), j] - torch.einsum('tb,tbn->bn', cis[:i, torch.arange(B), j], cis[:i])) \
            / torch.sqrt(di2s[torch.arange(B), j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(B), j] = -float('inf')
    select_idx = torch.sort(select_idx.t()).values  # (B, T)
    index_masks = torch.zeros(B, N, dtype=torch.bool, device=device)
    index_masks.scatter_(1, select_idx, True)
    return index_masks
