"""Configs of small random-weight models of every supported family, made in one place.

Tests, benchmarks, `pruneware bench`, the vLLM plugin's tiny checkpoints and the embedded
models all need configs of the real architectures at toy sizes. Each family nests its configs
differently, names its token ids and vision sizes differently, and needs M-RoPE sections that
fit its head size; that knowledge lives here. Callers speak one vocabulary (layers, hidden,
heads, ...) and override anything else by the family's own names:

    config = tiny_config("llava", layers=4, vision={"image_size": 56}, ids={"image": 90})

Nothing is downloaded; only configs are built (the caller instantiates the model).
"""

from __future__ import annotations

from typing import Any

FAMILIES = ("llava", "llava-next", "qwen2-vl", "qwen2.5-vl", "qwen3-vl")

# The vision tower of each family at toy size, in the family's own names.
_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=14)
_QWEN_PATCHES = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
VISION_DEFAULTS: dict[str, dict[str, Any]] = {
    "llava": {**_CLIP, "image_size": 56},  # a 4x4 patch grid: 16 image tokens
    "llava-next": {**_CLIP, "image_size": 42},  # 42-px tiles: a 3x3 patch grid each
    "qwen2-vl": dict(depth=1, embed_dim=32, mlp_ratio=2, num_heads=2, **_QWEN_PATCHES),
    "qwen2.5-vl": dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, window_size=56,
                       fullatt_block_indexes=[0], **_QWEN_PATCHES),
    "qwen3-vl": dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=64,
                     deepstack_visual_indexes=[0, 1, 2], **_QWEN_PATCHES),
}
# Placeholder token ids, by role; each family names them its own way.
IDS = {"image": 90, "video": 91, "vision_start": 92, "vision_end": 93}
_ID_NAMES = {
    "llava": {"image": "image_token_id"},
    "llava-next": {"image": "image_token_index"},
    **{f: {role: f"{role}_token_id" for role in IDS} for f in ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")},
}


def mrope_section(head_dim: int) -> list[int]:
    """(temporal, height, width) rotary pairs of a head, in the Qwen2-VL proportions 2:3:3
    (e.g. [16, 24, 24] at head_dim 128); they sum to head_dim / 2."""
    if head_dim % 16:
        raise ValueError(f"head_dim {head_dim} does not split 2:3:3 into M-RoPE sections; pass mrope=[t, h, w]")
    return [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]


def tiny_config(
    family: str, *, layers: int = 6, hidden: int = 64, heads: int = 4, kv_heads: int = 2, mlp: int = 128,
    vocab: int = 96, max_positions: int = 4096, rope_theta: float | None = None,
    mrope: list[int] | None = None, text: dict[str, Any] | None = None, vision: dict[str, Any] | None = None,
    ids: dict[str, int] | None = None, **top: Any,
):
    """A config of `family` (one of `FAMILIES`) at toy size.

    Args:
        layers, hidden, heads, kv_heads, mlp, vocab, max_positions: the language model's sizes.
        rope_theta, mrope: RoPE base (default: the family's own; 10000 for Qwen) and, for
            Qwen families, the M-RoPE sections (default `mrope_section(head_dim)`; Qwen3-VL
            interleaves them).
        text: more text-config entries (e.g. `pad_token_id`, `head_dim`), by transformers' names.
        vision: vision-config entries over `VISION_DEFAULTS[family]`, by the family's names.
        ids: placeholder token ids by role ("image", "video", "vision_start", "vision_end")
            over `IDS`; only the roles the family has are used.
        top: more top-level config entries, verbatim (e.g. `vision_feature_layer`).
    """
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; valid families: {', '.join(FAMILIES)}")
    text_cfg: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
    )
    text_cfg.update(text or {})
    vision_cfg = {**VISION_DEFAULTS[family], **(vision or {})}
    roles = {**IDS, **(ids or {})}
    top = {name: roles[role] for role, name in _ID_NAMES[family].items()} | top
    if family in ("llava", "llava-next"):
        if rope_theta is not None:
            text_cfg.setdefault("rope_theta", rope_theta)
        cls = transformers.LlavaConfig if family == "llava" else transformers.LlavaNextConfig
        return cls(vision_config=transformers.CLIPVisionConfig(**vision_cfg),
                   text_config=transformers.LlamaConfig(**text_cfg), **top)
    width = text_cfg["hidden_size"]
    head_dim = text_cfg.get("head_dim") or width // text_cfg["num_attention_heads"]
    rope = {"rope_type": "default", "rope_theta": 10000.0 if rope_theta is None else rope_theta,
            "mrope_section": mrope or mrope_section(head_dim)}
    if family == "qwen3-vl":
        rope["mrope_interleaved"] = True
    text_cfg.setdefault("rope_parameters", rope)
    if family == "qwen2-vl":
        vision_cfg.setdefault("hidden_size", width)
        cls = transformers.Qwen2VLConfig
    else:
        vision_cfg.setdefault("out_hidden_size", width)
        cls = transformers.Qwen2_5_VLConfig if family == "qwen2.5-vl" else transformers.Qwen3VLConfig
    return cls(text_config=text_cfg, vision_config=vision_cfg, **top)
