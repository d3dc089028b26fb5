"""Put a tiny checkpoint in a layout that vLLM loads and its CPU attention runs, exactly.

Three changes, none of which changes the model's function:

- **Width** (only for families whose adapter sets `vllm_head_dim_from_width`). vLLM's Qwen2
  language model (used by Qwen2-VL and Qwen2.5-VL) derives its head size as hidden_size /
  num_heads and ignores `head_dim`, so the residual stream is widened to num_heads x 32 first: the new dims are zero in the embeddings and in everything that
  writes to the stream, and zero-weighted in everything that reads it. An RMSNorm then sees
  the same values plus zeros, so its mean square shrinks by H/H'; its weights are scaled by
  sqrt(H/H') and its eps by H/H', which gives back the same output exactly. What is not
  unchanged: anything that reads the width itself, such as the 1/sqrt(D) scale of CrossLMM's
  training-free attention over the visual embeddings (D = 128 instead of 96).

- **Head size.** vLLM's CPU attention takes head sizes 32, 64, 80, 96, 112, 128, 160, 192, 224,
  256 and 512 only (`vllm/v1/attention/backends/cpu_attn.py`). A language model with head size
  d < 32 is re-parametrised to d' = 32: every head's q/k/v rows and o_proj columns are placed
  in the rotary pair layout (first halves at 0..d/2-1, second halves at d'/2..d'/2+d/2-1), the
  new rows and columns are zero, q is scaled by sqrt(d'/d) so the softmax scale 1/sqrt(d') stays
  1/sqrt(d), and rope_theta becomes theta**(d'/d) so the d/2 real frequency pairs keep their
  frequencies: theta'**(-2i/d') = theta**(-2i/d). The padded pairs are zero in q and k, so their
  frequencies do not matter; an M-RoPE `mrope_section` is padded on its last axis to sum d'/2.
- **Key names.** The LLaVA vision tower is written as `vision_tower.vision_model.*`, the hub
  layout that both transformers and vLLM's loader read (transformers 5 writes
  `vision_tower.*`, which vLLM's loader rejects).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

SERVING_HEAD_DIM = 32
# The language model's attention projections (LLaVA: language_model.model.layers.N, Qwen:
# model.layers.N or model.language_model.layers.N); the vision towers' are left alone.
_ATTN = re.compile(
    r"^(?:language_model\.model\.|model\.language_model\.|model\.)layers\.\d+\.self_attn\."
    r"(?P<proj>[qkvo])_proj\.(?P<kind>weight|bias)$"
)


def _pair_index(old: int, new: int) -> torch.Tensor:
    """[old] long: where each of a head's `old` dims goes in a head of `new` dims (rotary pairs)."""
    half, new_half = old // 2, new // 2
    return torch.cat([torch.arange(half), new_half + torch.arange(half)])


def _widen_rows(t: torch.Tensor, heads: int, old: int, new: int, scale: float = 1.0) -> torch.Tensor:
    """[heads*old, ...] -> [heads*new, ...], each head's rows moved to its pair slots, rest zero."""
    out = t.new_zeros((heads, new) + tuple(t.shape[1:]))
    out[:, _pair_index(old, new)] = t.reshape((heads, old) + tuple(t.shape[1:])) * scale
    return out.reshape((heads * new,) + tuple(t.shape[1:]))


def widen_heads(state: dict[str, torch.Tensor], text_config: Any, new: int = SERVING_HEAD_DIM) -> dict[str, torch.Tensor]:
    """A copy of `state` with the language model's attention heads widened from
    `text_config.head_dim` to `new` dims; `text_config` is updated in place (head_dim,
    rope_theta, mrope_section). A no-op when the head size is already `new` or larger."""
    old = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    if old >= new:
        return dict(state)
    if old % 2 or new % 2:
        raise ValueError(f"rotary head sizes must be even, got {old} -> {new}")
    q_heads, kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
    scale = math.sqrt(new / old)
    out = {}
    for name, tensor in state.items():
        match = _ATTN.match(name)
        if match is None:
            out[name] = tensor
            continue
        proj, kind = match["proj"], match["kind"]
        if proj == "o":  # [hidden, heads*old] columns; o_proj has no per-head bias
            out[name] = tensor if kind == "bias" else _widen_rows(tensor.T, q_heads, old, new).T.contiguous()
        else:
            heads = q_heads if proj == "q" else kv_heads
            out[name] = _widen_rows(tensor, heads, old, new, scale if proj == "q" else 1.0)
    rope = dict(text_config.rope_parameters)
    rope["rope_theta"] = float(f"{float(rope['rope_theta']) ** (new / old):.12g}")  # 1000**(4/3) -> 10000.0
    if "mrope_section" in rope:
        section = list(rope["mrope_section"])
        section[-1] += new // 2 - sum(section)
        rope["mrope_section"] = section
    text_config.rope_parameters = rope
    text_config.head_dim = new
    return out


def hub_key_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP/SigLIP `vision_tower.*` (LLaVA families, as transformers 5 writes it) in the hub
    layout `vision_tower.vision_model.*`; other keys (Qwen's `visual.*`) are left alone."""
    prefix, hub = "vision_tower.", "vision_tower.vision_model."
    return {
        (hub + k[len(prefix):] if k.startswith(prefix) and not k.startswith(hub) else k): v for k, v in state.items()
    }


_LM = r"^(?:language_model\.model\.|model\.language_model\.|model\.)"
_READS = re.compile(_LM + r"(?:embed_tokens\.weight|layers\.\d+\.(?:self_attn\.[qkv]_proj|mlp\.(?:gate|up)_proj)\.weight)$"
                    r"|^(?:language_model\.)?lm_head\.weight$"
                    r"|^multi_modal_projector\.linear_2\.weight$")  # [*, H]: pad columns
_WRITES = re.compile(_LM + r"layers\.\d+\.(?:self_attn\.o_proj|mlp\.down_proj)\.weight$"
                     r"|^(?:multi_modal_projector\.linear_[12]|visual\.merger\.mlp\.2)\.(?:weight|bias)$")  # [H, ...]: pad rows
_NORMS = re.compile(_LM + r"(?:layers\.\d+\.(?:input|post_attention)_layernorm|norm)\.weight$")


_PER_HEAD = re.compile(r"self_attn\.[qkv]_proj\.bias$")  # per-head rows, widened by widen_heads
_VISION = ("vision_tower.", "visual.", "multi_modal_projector.")


def widen_hidden(state: dict[str, torch.Tensor], config: Any, new: int) -> dict[str, torch.Tensor]:
    """A copy of `state` with the language model's residual stream widened from
    `text_config.hidden_size` to `new`; `config` is updated in place. See the module docstring."""
    text = config.text_config
    old = text.hidden_size
    if new <= old:
        return dict(state)
    ratio = old / new
    out = {}
    for name, tensor in state.items():
        known = False
        if _READS.match(name):
            tensor, known = torch.cat([tensor, tensor.new_zeros(tensor.shape[0], new - old)], dim=1), True
        if _NORMS.match(name):
            tensor = tensor * math.sqrt(ratio)
        if _WRITES.match(name) or _NORMS.match(name):
            tensor, known = torch.cat([tensor, tensor.new_zeros((new - old,) + tuple(tensor.shape[1:]))], dim=0), True
        if known:
            pass
        elif old in tensor.shape and not _PER_HEAD.search(name) and not name.startswith(_VISION):
            raise ValueError(f"widen_hidden does not know how {name} {tuple(tensor.shape)} meets the residual stream")
        out[name] = tensor
    text.rms_norm_eps = text.rms_norm_eps * ratio
    text.head_dim = getattr(text, "head_dim", None) or old // text.num_attention_heads
    text.hidden_size = new
    vision = getattr(config, "vision_config", None)
    if vision is not None and getattr(vision, "out_hidden_size", None) == old:
        vision.out_hidden_size = new
    return out


def to_serving_layout(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """`state` (keys as transformers writes them) in the serving layout; `config` is updated in
    place. With an empty `state`, converts the config alone."""
    from pruneware.adapters import adapter_class

    text = config.text_config
    if adapter_class(config).vllm_head_dim_from_width:
        width = text.num_attention_heads * max(SERVING_HEAD_DIM, text.hidden_size // text.num_attention_heads)
        state = widen_hidden(state, config, width)
    state = widen_heads(state, text)
    return hub_key_names(state)


def convert_checkpoint(folder: str | Path) -> bool:
    """Rewrite the HF checkpoint in `folder` (config.json, model.safetensors) in place in the
    serving layout. Returns False, changing nothing, when it is already in that layout.
    Tokenizer and processor files are left alone."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    renamed = to_serving_layout(state, config)
    if renamed.keys() == state.keys() and all(renamed[k] is state[k] for k in state):
        return False
    save_file({k: v.contiguous() for k, v in renamed.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(folder)
    return True


__all__ = ["SERVING_HEAD_DIM", "convert_checkpoint", "hub_key_names", "to_serving_layout", "widen_heads", "widen_hidden"]
