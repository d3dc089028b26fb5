"""Vision-side stages (`vitK`, `pre-vit`) in vLLM: vLLM's own vision modules, run block by block.

A `vitK` stage runs blocks[:K] of the vision tower on every patch, chooses each item's kept 2x2
units (Qwen2.5-VL) or patches (LLaVA's CLIP) with the stage's policy, and runs blocks[K:] and
the merger / projector on the kept rows only; `pre-vit` chooses from the raw patches and cuts
before block 0. Only the number of placeholder tokens changes for vLLM, and the plugin already
fixes it per item (`PruneSpec.frame`). The cut itself (which rows, the rebuilt `cu_seqlens`,
ragged `cu_window_seqlens`, rotary rows) is pruneware's (`adapters.qwen_vit`, `adapters.clip_vit`),
and the policy's input is the HF session's (`engine.vit_stages.unit_input`), so a kept set here is
the one the HF path picks for the same image. Each runner returns, per item, the kept rows in
row-major order and their row-major unit indices: what `prune.prune_item` returns for a `pre`
stage, so positions are laid out as for a `pre` stage with the same kept set.

Differences from the HF session: the budget applies per video frame (as every stage in vLLM:
see `spec`); a `pre-vit` policy may keep fewer units than its budget (`pixelprune`): the processor
then computes the kept count from the item's pixels. Imports vllm only inside functions.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from pruneware.adapters.clip_vit import ClipVisionCut
from pruneware.adapters.qwen_vit import QwenVisionCut
from pruneware.engine.vit_stages import unit_input
from pruneware.integrations.vllm.spec import PruneSpec


def select_units(spec: PruneSpec, feats: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """[k] long, ascending: the units of one item the stage keeps.

    feats: [T*h*w, C] per unit, row-major frame after frame (block-K states or raw patches);
    grid: (T, h, w) frames and units per frame. The budget is `spec.budget(h, w)` per frame.
    """
    frames, rows, cols = grid
    inputs, _ = unit_input(spec.stage, feats, None, [grid], spec.stage_seed)
    with torch.no_grad():
        picked = spec.policy.select(inputs, [frames * spec.budget(rows, cols)])[0]
    return picked.to(feats.device).sort().values


def pixel_keep_count(spec: PruneSpec, pixels: torch.Tensor, grid: tuple[int, int, int], patch: int | None,
                     normalize: Any = None) -> int:
    """Units a `pre-vit` stage keeps of one item, read from its processed pixels (what the
    processor puts in the prompt). pixels: Qwen [T*h*w*4, C*tp*P*P] (patch None: 2x2 units),
    LLaVA [1, C, H, W] (patch: the CLIP patch size); normalize: the tower's `input_norm` (vLLM
    may ship raw uint8 pixels and normalise them on the device), or None."""
    if normalize is not None:
        pixels = normalize(pixels, torch.float32)
    if patch is None:
        feats = QwenVisionCut.pixel_features(SimpleNamespace(unit=4), pixels)  # type: ignore[arg-type]
    else:
        clip = SimpleNamespace(vc=SimpleNamespace(patch_size=patch))
        feats = ClipVisionCut.pixel_features(clip, pixels)  # type: ignore[arg-type]
    return int(select_units(spec, feats, grid).numel())


def raw_pixel_norm(model_config: Any) -> Any:
    """A callable (pixels, dtype) -> normalised pixels for the processor side: vLLM ships Qwen's
    pixels as raw uint8 when `mm_device_do_normalize` is on and normalises them in the tower
    (`input_norm`, vLLM's FusedMMInputNorm); this applies the same per-channel affine map (in fp32)
    to [patches, C * rest] uint8 rows and leaves normalised ones as they are."""

    def normalize(pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if pixels.dtype != torch.uint8:
            return pixels.to(dtype)
        from vllm.model_executor.layers.fusion.mm_input_norm import _load_norm_params

        params = _load_norm_params(model_config)
        mean, std = torch.tensor(params.image_mean), torch.tensor(params.image_std)
        weight, bias = params.rescale_factor / std, -mean / std
        x = pixels.reshape(pixels.shape[0], len(mean), -1) * weight.view(1, -1, 1) + bias.view(1, -1, 1)
        return x.view(pixels.shape).to(dtype)

    return normalize


def _check_count(spec: PruneSpec, keep: torch.Tensor, grid: tuple[int, int, int]) -> None:
    expected = grid[0] * spec.budget(grid[1], grid[2])
    if spec.stage.where != "pre-vit" and keep.numel() != expected:
        raise RuntimeError(
            f"policy {spec.stage.policy!r} kept {keep.numel()} units of an item of grid {grid} at {spec.stage.where}, "
            f"but the prompt holds {expected} placeholders: in vLLM a `vitK` policy must keep its whole budget "
            "(a policy that keeps fewer, such as pixelprune, runs at 'pre-vit', where its count is read from the pixels)"
        )


class QwenViTRunner:
    """Runs vLLM's `Qwen2_5_VisionTransformer` with a cut before block K (see the module docstring)."""

    def __init__(self, visual: torch.nn.Module, spec: PruneSpec):
        self.visual, self.spec = visual, spec
        self.block = int(spec.stage.vit_block)  # type: ignore[arg-type]
        self.cut = QwenVisionCut.rules_only(visual)  # the cut's rules, on vLLM's window order

    def _attention_inputs(self, cu: torch.Tensor) -> dict[str, Any]:
        """What a block receives for boundaries `cu` (as vLLM's `prepare_encoder_metadata` builds it)."""
        from vllm.model_executor.layers.attention.mm_encoder_attention import MMEncoderAttention

        v, cu_np = self.visual, cu.cpu().numpy()
        return {
            "cu_seqlens": MMEncoderAttention.maybe_recompute_cu_seqlens(
                v.attn_backend, cu_np, v.hidden_size, v.tp_size, v.device, fp8_padded_hidden_size=v.fp8_padded_hidden_size),
            "max_seqlen": torch.tensor(MMEncoderAttention.compute_max_seqlen(v.attn_backend, cu_np), dtype=torch.int32),
            "sequence_lengths": MMEncoderAttention.maybe_compute_seq_lens(v.attn_backend, cu_np, v.device),
        }

    def run(self, pixels: torch.Tensor, grid_thw: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per item of the call: ([k, D] merged kept units, row-major; [k] their unit indices).
        pixels: [sum T*H*W, C*tp*P*P] the call's patches (processor order); grid_thw: per item (T, H, W)."""
        v, unit = self.visual, self.cut.unit
        meta = v.prepare_encoder_metadata(grid_thw)
        window_index = meta["window_index"].long()
        self.cut.order = lambda grid: (window_index, meta["cu_window_seqlens"])  # instance attribute: vLLM's order
        pixels = v.input_norm(pixels.to(device=v.device), v.dtype)  # uint8 pixels are normalised here
        hidden = v.patch_embed(pixels)
        seq = hidden.shape[0]
        hidden = hidden.reshape(seq // unit, unit, -1)[window_index].reshape(seq, 1, -1)
        cos, sin = meta["rotary_pos_emb_cos"], meta["rotary_pos_emb_sin"]
        full = {"cu_seqlens": meta["cu_seqlens"], "max_seqlen": meta["max_seqlen_full"],
                "sequence_lengths": meta.get("sequence_lengths_full")}
        window = {"cu_seqlens": meta["cu_window_seqlens"], "max_seqlen": meta["max_seqlen_window"],
                  "sequence_lengths": meta.get("sequence_lengths_window")}
        grid = torch.tensor(grid_thw)
        units = self.cut.units(grid)
        for b, block in enumerate(v.blocks):
            if b == self.block:
                if self.spec.stage.where == "pre-vit":
                    feats = self.cut.pixel_features(pixels)
                else:
                    feats = self.cut.unit_features(hidden[:, 0], grid)
                keep = torch.zeros(feats.shape[0], dtype=torch.bool, device=feats.device)
                start = 0
                for item in units:
                    n = item[0] * item[1] * item[2]
                    picked = select_units(self.spec, feats[start : start + n], item)
                    _check_count(self.spec, picked, item)
                    keep[start + picked] = True
                    start += n
                cut = self.cut.cut(grid, keep)
                hidden, cos, sin = hidden[cut.rows], cos[cut.rows], sin[cut.rows]
                full, window = self._attention_inputs(cut.cu_full), self._attention_inputs(cut.cu_window)
            attention = full if b in self.cut.full_blocks else window
            hidden = block(hidden, rotary_pos_emb_cos=cos, rotary_pos_emb_sin=sin, **attention)
        if hidden.dtype == torch.float16:  # as vLLM's tower does before its merger
            from vllm.model_executor.models.qwen2_5_vl import cast_overflow_tensors

            hidden = cast_overflow_tensors(hidden)
        merged = v.merger(hidden)  # [k, D] in the tower's (window) order
        raster = window_index[cut.kept_pos.to(window_index.device)]
        order = raster.argsort()
        merged, raster = merged[order.to(merged.device)], raster[order]
        out, start, offset = [], 0, 0
        for item in units:
            n = item[0] * item[1] * item[2]
            k = int(keep[offset : offset + n].sum())
            out.append((merged[start : start + k], raster[start : start + k] - offset))
            start, offset = start + k, offset + n
        return out


class ClipViTRunner:
    """Runs vLLM's CLIP tower (LLaVA-1.5) and projector with a cut before layer K."""

    def __init__(self, config: Any, tower: torch.nn.Module, projector: torch.nn.Module, spec: PruneSpec):
        self.cut = ClipVisionCut(config, tower, projector)  # refuses feature strategies other than 'default'
        self.model = getattr(tower, "vision_model", tower)
        self.projector, self.spec = projector, spec
        self.block = int(spec.stage.vit_block)  # type: ignore[arg-type]

    def run(self, pixels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image: ([k, D] projected kept patches, row-major; [k] their patch indices). pixels: [n, C, H, W].
        Images that keep as many patches run the layers after the cut together (`ClipVisionCut.cut`)."""
        m = self.model
        hidden = m.pre_layrnorm(m.embeddings(pixels.to(m.dtype)))  # [n, 1 + h*w, d]
        grid = self.cut.call_grid((pixels,), {})
        item = tuple(grid[0].tolist())
        layers = m.encoder.layers  # vLLM loads them up to the feature layer
        for layer in layers[: self.block]:
            hidden = layer(hidden)
        if self.spec.stage.where == "pre-vit":
            feats = self.cut.pixel_features(pixels)
        else:
            feats = self.cut.unit_features(hidden, grid)
        n = item[1] * item[2]
        picked = [select_units(self.spec, feats[i * n : (i + 1) * n], item) for i in range(grid.shape[0])]
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * grid.shape[0]
        for count in sorted({p.numel() for p in picked}):
            images = [i for i, p in enumerate(picked) if p.numel() == count]
            keep = torch.zeros(len(images), n, dtype=torch.bool, device=feats.device)
            for row, i in enumerate(images):
                _check_count(self.spec, picked[i], item)
                keep[row, picked[i]] = True
            cut = self.cut.cut(grid[: len(images)], keep.view(-1))
            part = self.cut.cut_hidden(cut, hidden[images])
            for layer in layers[self.block :]:
                part = layer(part)
            features = part[:, 1:]  # the 'default' strategy: [CLS] left out
            if m.post_layernorm is not None:
                features = m.post_layernorm(features)
            embeds = self.projector(features)  # [len(images), k, D]
            for row, i in enumerate(images):
                out[i] = (embeds[row], cut.index[row, 1:] - 1)
        return out  # type: ignore[return-value]
