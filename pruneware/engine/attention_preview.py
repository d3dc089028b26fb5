"""Previewing a decoder layer's attention on its unpruned input (PyramidDrop's ranking).

A policy with `Needs(attention="own")` ranks tokens by the attention layer K itself would
compute, before the stage at K prunes its input. Two ways, one result:
  - fused (`fused_preview`): for a Llama-style layer (the module code of transformers'
    `LlamaRMSNorm` and `LlamaAttention`, rotate-half RoPE rows [B|1, L, d]) and a policy that
    reads the last row's attention, `pruneware.kernels.preview` computes the last row's softmax
    over every key straight from the layer's input, norm weight, q/k projections and RoPE rows:
    one kernel call (three launches on CUDA) instead of the module calls and the capture;
  - generic (`run_preview`): the session calls layer K's attention module on the level's states
    (through the layer's input norm, with the layer's mask and RoPE, without the cache); the
    registered capture (see attention_capture.py) scores the query rows from q and k and raises
    `PreviewDone`, so the attention product, the output projection and any cache update never
    run. The model's own projections, norms and RoPE produce q and k, for every family.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRMSNorm

from pruneware.engine.stage_inputs import no_grad, query_layout
from pruneware.kernels.preview import preview_scores
from pruneware.policies import Policy

if TYPE_CHECKING:
    from pruneware.engine.levels import Level
    from pruneware.engine.request import RequestState

_NOT_FOR_PREVIEW = ("cache", "past_key_values", "past_key_value", "use_cache", "output_attentions", "hidden_states")


class PreviewDone(Exception):
    """Raised by the capture once a preview has its q and k: the preview needs no attention output."""


def run_preview(layer: nn.Module, hidden: torch.Tensor, layer_kwargs: dict[str, Any]) -> None:
    """Run `layer`'s input norm and attention on hidden [B, Ls, D] until the capture stops it.

    layer_kwargs: the keyword arguments the layer receives for this level (mask, RoPE, ...).
    """
    attn_kwargs = {k: v for k, v in layer_kwargs.items() if k not in _NOT_FOR_PREVIEW}
    try:
        with torch.no_grad():
            layer.self_attn(hidden_states=layer.input_layernorm(hidden), **attn_kwargs)
    except PreviewDone:
        pass


def _same_code(fn: Any, model: Any) -> bool:
    """Whether the function `fn` is `model`'s code (a copy in another family's modeling file counts;
    decorators such as transformers' `deprecate_kwarg` are looked through)."""
    code, want = getattr(inspect.unwrap(fn), "__code__", None), inspect.unwrap(model).__code__
    return code is not None and code.co_code == want.co_code and code.co_names == want.co_names


def fusable(layer: nn.Module, layer_kwargs: dict[str, Any]) -> bool:
    """Whether `fused_preview` computes what `run_preview` would for this layer: a Llama-style
    input RMSNorm and attention module (the same code as transformers' Llama ones: plain q/k
    projections, no q/k norm, no sliding window), and 1-D RoPE rows [B|1, L, head_dim]."""
    norm, attn = getattr(layer, "input_layernorm", None), getattr(layer, "self_attn", None)
    cos_sin = layer_kwargs.get("position_embeddings")
    if norm is None or attn is None or cos_sin is None:
        return False
    if not _same_code(type(norm).forward, LlamaRMSNorm.forward):
        return False
    if not _same_code(type(attn).forward, LlamaAttention.forward):
        return False
    head_dim = getattr(attn, "head_dim", None)
    return cos_sin[0].dim() == 3 and cos_sin[0].shape[-1] == head_dim and head_dim % 2 == 0


def fused_preview(
    layer: nn.Module, hidden: torch.Tensor, layer_kwargs: dict[str, Any], key_mask: torch.Tensor | None,
    weights: torch.Tensor,
) -> torch.Tensor:
    """[B, Ls] float32: `weights[b]` times the attention the last row of hidden [B, Ls, D] pays each
    key in `layer`, summed over heads (a layer `fusable` accepts); key_mask: [B, Ls] bool or None."""
    norm, attn = layer.input_layernorm, layer.self_attn
    cos, sin = layer_kwargs["position_embeddings"]
    config = attn.config
    return preview_scores(
        hidden, norm.weight, norm.variance_epsilon, attn.q_proj.weight, attn.q_proj.bias, attn.k_proj.weight,
        attn.k_proj.bias, cos, sin, config.num_attention_heads, config.num_key_value_heads,
        key_mask=key_mask, weights=weights, scale=attn.scaling,
    )


def last_row_preview(
    state: RequestState, policy: Policy, level: Level, layer: nn.Module, hidden: torch.Tensor,
    layer_kwargs: dict[str, Any],
) -> torch.Tensor | None:
    """[B, Ls] what the capture would give `policy` from `layer`'s preview on `level` (hidden:
    [B, Ls, D], its input), by `fused_preview`; None where the generic preview must run: a policy
    that reads other rows than the last or anything but their attention, or a layer `fusable` refuses.
    The key mask and the row weight are the capture's (see `stage_inputs.captured_scores`)."""
    needs = policy.needs
    if needs.captures != "attention" or needs.query != "last" or needs.query_block is not None or needs.raters:
        return None
    if not fusable(layer, layer_kwargs):
        return None
    key_mask = None if state.padding0 is None and level.all_valid else state.real_tokens(level)
    rows = query_layout("last", level, key_mask, None, hidden.device, False)
    weights = policy.row_weights(None, rows.valid)  # [B, 1], or [B, H, 1] per head
    if weights.dim() != 2:
        return None
    weights = weights if weights.dtype == torch.float32 else weights.float()
    with no_grad():
        return fused_preview(layer, hidden, layer_kwargs, key_mask, weights)
