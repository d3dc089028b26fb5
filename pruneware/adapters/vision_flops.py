"""Vision-side FLOPs: the vision encoder and its projector into the language model, per image.

The formulas; each adapter applies its family's (`Adapter.tower_call_flops`,
`Adapter.input_vision_flops`).

Counted analytically from the model's config and the patches the encoder actually receives,
the same way `pruneware.report.layer_flops` counts the language model: 2 FLOPs per multiply-add
of every linear layer and convolution, and 4 * n^2 * width per full (bidirectional) attention
over n tokens (QK^T and PV); norms, activations and RoPE are not counted.

  - LLaVA (CLIP): (H / patch) * (W / patch) patches plus [CLS] through every encoder layer
    (HF runs them all, whatever `vision_feature_layer`), then the projector on the selected
    tokens. A fixed-size tower: every plan, `resize` included, gives the same count.
  - Qwen2-VL, Qwen2.5-VL, Qwen3-VL: t * h * w patches from `grid_thw`; Qwen2.5-VL's windowed
    blocks attend within windows of `window_size` pixels, its `fullatt_block_indexes` over the
    whole image; the PatchMerger (and Qwen3-VL's DeepStack mergers) run on the merged tokens.
    `resize` feeds the tower fewer patches, so its count drops.
  - LLaVA-NeXT: each image's tiles (the base tile plus its anyres tiles, as many as
    `image_size_to_num_patches` gives for its `image_sizes` entry) each cost one LLaVA-1.5 image:
    the tower and the projector run on every tile before unpadding. Counted from the processor's
    inputs (a tower call sees the tiles of the whole batch flattened, so it records nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _linear(tokens: float, fan_in: int, fan_out: int) -> float:
    return 2.0 * tokens * fan_in * fan_out


def _attention(tokens: float, width: int) -> float:
    return 4.0 * tokens * tokens * width


def clip_image_flops(vision_config, projector_in: int, text_hidden: int, n_patches: int, n_selected: int) -> float:
    """A CLIP tower on one image of `n_patches` patches (+ [CLS]) and LLaVA's two-layer
    projector on the `n_selected` tokens it reads (`projector_in` wide)."""
    d, inter, p = vision_config.hidden_size, vision_config.intermediate_size, vision_config.patch_size
    n = n_patches + 1
    flops = _linear(n_patches, vision_config.num_channels * p * p, d)  # patch embedding (conv)
    per_layer = _linear(n, d, 4 * d) + _linear(n, d, inter) + _linear(n, inter, d) + _attention(n, d)
    flops += vision_config.num_hidden_layers * per_layer
    return flops + _linear(n_selected, projector_in, text_hidden) + _linear(n_selected, text_hidden, text_hidden)


def _window_sizes(units_h: int, units_w: int, window_units: int) -> list[int]:
    """Merged units per attention window of a (units_h x units_w) grid, as HF tiles it."""
    hs = [min(window_units, units_h - i) for i in range(0, units_h, window_units)]
    ws = [min(window_units, units_w - j) for j in range(0, units_w, window_units)]
    return [a * b for a in hs for b in ws]


@dataclass(frozen=True)
class QwenTower:
    """What differs between the Qwen vision towers (each adapter reads it from the config).

    width, intermediate, out: block width, MLP width, merger output width; mlp_mats: 2, or 3
    for a gated MLP (Qwen2.5-VL); full_blocks: the blocks that attend over the whole image
    (None: all), the others within windows of `window_units` merged units (Qwen2.5-VL);
    mergers: PatchMergers run on the merged tokens (Qwen3-VL's DeepStack adds some).
    """

    width: int
    intermediate: int
    out: int
    mlp_mats: int = 2
    full_blocks: tuple[int, ...] | None = None
    window_units: int = 0
    mergers: int = 1


def qwen_image_flops(vc, tower: QwenTower, t: int, h: int, w: int) -> float:
    """A Qwen vision tower (`vc`: its vision config) on one image or video of (t, h, w) patches."""
    n = t * h * w
    merge = vc.spatial_merge_size
    unit = merge * merge
    patch_in = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    d = tower.width
    flops = _linear(n, patch_in, d)
    full = t * _attention(h * w, d)  # one attention sequence per temporal step (HF's cu_seqlens)
    full_blocks, windowed = set(range(vc.depth)), full
    if tower.full_blocks is not None:  # blocks not in full_blocks attend within windows
        full_blocks = set(tower.full_blocks)
        sizes = _window_sizes(h // merge, w // merge, tower.window_units)
        windowed = t * sum(_attention(s * unit, d) for s in sizes)
    dense = _linear(n, d, 4 * d) + tower.mlp_mats * _linear(n, d, tower.intermediate)
    flops += sum(dense + (full if i in full_blocks else windowed) for i in range(vc.depth))
    merged = n / unit
    flops += tower.mergers * (_linear(merged, d * unit, d * unit) + _linear(merged, d * unit, tower.out))
    return flops


def llava_image_flops(config, height: int, width: int) -> float:
    """LLaVA-1.5's vision side on one image of (height, width) pixels."""
    vc = config.vision_config
    n_patches = (height // vc.patch_size) * (width // vc.patch_size)
    selected = n_patches + 1 if config.vision_feature_select_strategy == "full" else n_patches
    layers = config.vision_feature_layer
    width_in = vc.hidden_size * (len(layers) if isinstance(layers, list | tuple) else 1)
    return clip_image_flops(vc, width_in, config.text_config.hidden_size, n_patches, selected)


def llava_next_flops(config, pixels: torch.Tensor | None, image_sizes: torch.Tensor | None) -> list[float]:
    """Per image, LLaVA-NeXT's tiles times one tile's LLaVA-1.5 cost; ``pixels`` [B, tiles, C, H, W]
    (padded over tiles), ``image_sizes`` [B, 2] (height, width)."""
    if pixels is None or image_sizes is None:
        return []
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    tile = llava_image_flops(config, pixels.shape[-2], pixels.shape[-1])
    side = config.vision_config.image_size
    return [tile * image_size_to_num_patches(tuple(s), config.image_grid_pinpoints, side) for s in image_sizes.tolist()]


def qwen_tower_flops(vc, tower: QwenTower, n_patches: int, sequences: list[list[int]], merged: list[int]) -> float:
    """A Qwen vision tower on one image whose blocks ran on what a `vitK` stage left them.

    n_patches: patches embedded; sequences[b]: the lengths (in patches) of block b's attention
    sequences (its dense layers run on their sum); merged: units through each merger (the
    PatchMerger, then Qwen3-VL's DeepStack mergers).
    Equals `qwen_image_flops` when every block holds every patch.
    """
    d, unit = tower.width, vc.spatial_merge_size**2
    flops = _linear(n_patches, vc.in_channels * vc.temporal_patch_size * vc.patch_size**2, d)
    for lengths in sequences:
        n = sum(lengths)
        flops += _linear(n, d, 4 * d) + tower.mlp_mats * _linear(n, d, tower.intermediate)
        flops += sum(_attention(s, d) for s in lengths)
    return flops + sum(_linear(m, d * unit, d * unit) + _linear(m, d * unit, tower.out) for m in merged)


def clip_cut_flops(vc, projector_in: int, text_hidden: int, n_patches: int, tokens: list[int], n_selected: int) -> float:
    """A CLIP tower whose layer i ran on tokens[i] tokens ([CLS] included; a `vitK` stage cuts
    the later ones) and LLaVA's projector on `n_selected` tokens. Equals `clip_image_flops`
    when every layer holds n_patches + 1."""
    d, inter, p = vc.hidden_size, vc.intermediate_size, vc.patch_size
    flops = _linear(n_patches, vc.num_channels * p * p, d)
    for n in tokens:
        flops += _linear(n, d, 4 * d) + _linear(n, d, inter) + _linear(n, inter, d) + _attention(n, d)
    return flops + _linear(n_selected, projector_in, text_hidden) + _linear(n_selected, text_hidden, text_hidden)
