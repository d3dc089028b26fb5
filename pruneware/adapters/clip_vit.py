"""Cutting LLaVA-1.5's CLIP tower between layers (`vitK`, `pre-vit`): the counterpart of
`qwen_vit.QwenVisionCut` for a fixed-resolution tower with a [CLS] token.

Each image of a call is [1 + h*w, d] ([CLS] first); a unit is one patch (one visual token).
From layer K on, the layers run on [CLS] plus the kept patches, in their order (every image of a
call keeps as many: they have the same size and budget). `vision_feature_layer` is then read
from the kept rows (or, when it lies before K, from the full rows, of which the kept ones are
taken); the projector runs on the kept rows only and its output is spread back over the
image's 576 slots (zeros elsewhere), so the placeholders still line up. The hidden states the
tower returns for layers >= K have 1 + k rows. With several vision-side stages, each later cut
keeps a subset of the earlier one's patches (`parent`), and the feature layer is read from the
rows of whichever cut its layer ran under.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pruneware.adapters.vision import cls_attention
from pruneware.adapters.vision_flops import clip_cut_flops
from pruneware.errors import PlanError


@dataclass
class ClipCut:
    """mask: [n * h * w] bool, row-major per image, or None (then `keep` builds it from `patches_`
    when read); index: [n, 1 + k] the rows kept ([CLS] first); parent: the earlier cut whose rows
    this one's layer receives (None: the full rows); patches_: [n, k] index[:, 1:] - 1 when known;
    n_patches: h * w, the patches of one image."""

    mask: torch.Tensor | None
    index: torch.Tensor
    parent: ClipCut | None = None
    patches_: torch.Tensor | None = None
    n_patches: int = 0

    @property
    def keep(self) -> torch.Tensor:
        """[n * h * w] bool, row-major per image: the patches kept."""
        if self.mask is None:
            mask = torch.zeros(self.index.shape[0], self.n_patches, dtype=torch.bool, device=self.index.device)
            self.mask = mask.scatter_(1, self.patches, True).view(-1)
        return self.mask

    @property
    def patches(self) -> torch.Tensor:
        """[n, k] the kept patches' indices ([CLS] left out)."""
        if self.patches_ is None:
            self.patches_ = self.index[:, 1:] - 1
        return self.patches_


class ClipVisionCut:
    """The `Adapter.vision_cut()` of LLaVA-1.5 (see `qwen_vit.QwenVisionCut` for the interface).

    Beyond that interface (the session uses them when a cut has them): `unit_features` and
    `pixel_features` take `per_image` (every image of a call has as many patches), and
    `attention_scores` / `call_scores` read the [CLS] attention without the keys."""

    per_image_features = True

    def __init__(self, config: Any, tower: torch.nn.Module, projector: torch.nn.Module):
        layer = config.vision_feature_layer
        if config.vision_feature_select_strategy != "default" or not isinstance(layer, int):
            raise PlanError(
                "vision-side stages on LLaVA need a [CLS] token outside the visual tokens and one feature layer: "
                f"vision_feature_select_strategy='default' (got {config.vision_feature_select_strategy!r}) "
                f"and an integer vision_feature_layer (got {layer!r})"
            )
        self.config = config
        self.vc = config.vision_config
        self.tower = tower
        self.projector = projector
        self.layers = getattr(tower, "vision_model", tower).encoder.layers
        self.full_blocks = set(range(len(self.layers)))
        self.side = self.vc.image_size // self.vc.patch_size
        self._constants: dict[tuple, torch.Tensor] = {}  # grids and image indices, per shape and device

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def blocks(self) -> torch.nn.ModuleList:
        return self.layers

    def attention(self, block: int) -> torch.nn.Module:
        return self.layers[block].self_attn

    def call_grid(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """[n, 3] (1, h, w) patches per image of the call."""
        pixels = args[0] if args else kwargs["pixel_values"]
        h, w = pixels.shape[-2] // self.vc.patch_size, pixels.shape[-1] // self.vc.patch_size
        n = pixels.shape[0]
        return self._constant(("grid", n, h, w), None, lambda: torch.tensor([[1, h, w]] * n))

    def _constant(self, key: tuple, device: torch.device | None, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A tensor that depends only on `key`, built once (never written to)."""
        full = (*key, str(device), torch.is_inference_mode_enabled())
        if full not in self._constants:
            if len(self._constants) > 64:
                self._constants.clear()
            self._constants[full] = build()
        return self._constants[full]

    def _image_rows(self, n: int, device: torch.device) -> torch.Tensor:
        """[n, 1] 0..n-1: the image index that pairs with [n, k] row indices in one advanced index."""
        return self._constant(("images", n), device, lambda: torch.arange(n, device=device)[:, None])

    def units(self, grid: torch.Tensor) -> list[tuple[int, int, int]]:
        return [tuple(row) for row in grid.tolist()]  # type: ignore[misc]

    def call_units(self, grid: torch.Tensor, args: tuple, kwargs: dict) -> list[tuple[int, int, int]]:
        """`units(grid)` read from the pixels' shape, on the host (no read of `grid`)."""
        pixels = args[0] if args else kwargs["pixel_values"]
        p = self.vc.patch_size
        return [(1, pixels.shape[-2] // p, pixels.shape[-1] // p)] * pixels.shape[0]

    def unit_features(self, hidden: torch.Tensor, grid: torch.Tensor, cut: ClipCut | None = None,
                      per_image: bool = False) -> torch.Tensor:
        """[n * h * w, d] the patches' states ([CLS] left out), or [n, h * w, d] with `per_image`;
        hidden [n, 1 + h*w, d], or (after `cut`) [n, 1 + k, d] its kept rows, the other patches' states zeros."""
        patches = hidden[:, 1:]
        patches = patches if patches.dtype == torch.float32 else patches.float()
        if cut is not None:
            full = patches.new_zeros(hidden.shape[0], cut.n_patches, hidden.shape[-1])
            rows = _on(cut.patches, hidden.device)
            patches = full.index_put_((self._image_rows(hidden.shape[0], hidden.device), rows), patches)
        return patches if per_image else patches.reshape(-1, hidden.shape[-1])

    def full_parts(self, cut: ClipCut | None, parts: list[tuple[torch.Tensor, torch.Tensor | None]]) -> list:
        """One layer's [CLS] attention reads ([n, k] scores, [n, k, d] keys or None), laid over every
        patch (zeros on the patches `cut` dropped), as `vision_image_scores` reads them."""
        if cut is None:
            return parts
        scores = torch.cat([p[0] for p in parts])
        rows = _on(cut.patches, scores.device)
        n = self.side * self.side
        full_scores = scores.new_zeros(scores.shape[0], n).scatter(1, rows, scores)
        if parts[0][1] is None:
            return [(full_scores, None)]
        keys = torch.cat([p[1] for p in parts])
        full_keys = keys.new_zeros(keys.shape[0], n, keys.shape[-1]).scatter(
            1, rows[..., None].expand(-1, -1, keys.shape[-1]), keys)
        return [(full_scores, full_keys)]

    def attention_scores(self, query: torch.Tensor, key: torch.Tensor, scale: float | None,
                         kwargs: dict[str, Any]) -> tuple[torch.Tensor, None]:
        """`LlavaAdapter.vision_call_scores` without the keys, which no vision-side policy reads:
        ([n, L - 1] the attention [CLS] pays each row, averaged over heads, None). query, key: [n, H, L, d]."""
        return cls_attention(query, key, scale), None

    def call_scores(self, parts: list[tuple[torch.Tensor, torch.Tensor | None]], grid: torch.Tensor) -> torch.Tensor:
        """[n, h * w] per image of the call, its patches' scores (`full_parts` laid them over every patch)."""
        return parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts])

    def pixel_features(self, pixels: torch.Tensor, per_image: bool = False) -> torch.Tensor:
        """[n * h * w, C * P * P] each patch's pixels, row-major (or [n, h * w, C * P * P] with `per_image`)."""
        p = self.vc.patch_size
        n, c, height, width = pixels.shape
        x = pixels if pixels.dtype == torch.float32 else pixels.float()
        x = x.view(n, c, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(n, -1, c * p * p) if per_image else x.reshape(-1, c * p * p)

    def cut(self, grid: torch.Tensor, keep: torch.Tensor, parent: ClipCut | None = None) -> ClipCut:
        per_image = keep.view(grid.shape[0], -1)
        counts = per_image.sum(dim=1).tolist()
        if len(set(counts)) > 1:
            raise ValueError(f"the images of one CLIP call must keep as many patches each, got {counts}")
        patches = per_image.nonzero()[:, 1].view(grid.shape[0], -1) + 1
        cls = torch.zeros(grid.shape[0], 1, dtype=torch.long, device=keep.device)
        return ClipCut(keep, torch.cat([cls, patches], dim=1), parent, n_patches=per_image.shape[1])

    def cut_rows(self, grid: torch.Tensor, units: list[tuple[int, int, int]], rows: torch.Tensor,
                 parent: ClipCut | None = None) -> ClipCut:
        """`cut` from the kept patches of every image, rows [n, k] (sorted per image): no mask to read
        back, and none built unless read (`ClipCut.keep`)."""
        return ClipCut(None, F.pad(rows + 1, (1, 0)), parent, rows, units[0][1] * units[0][2])  # [CLS] (row 0) first

    def cut_hidden(self, cut: ClipCut, hidden: torch.Tensor) -> torch.Tensor:
        """[n, rows, d] -> [n, 1 + k, d] the kept rows; `rows` is the full 1 + h*w, or as many as
        an earlier cut of the chain kept (the feature layer may lie under any of them)."""
        source = cut.parent
        while source is not None and source.index.shape[1] != hidden.shape[1]:
            source = source.parent
        index = cut.index if source is None else torch.searchsorted(source.index, cut.index)
        return hidden[self._image_rows(hidden.shape[0], hidden.device), _on(index, hidden.device)]

    def block_kwargs(self, cut: ClipCut, block: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {}  # CLIP's layers take no per-row kwargs (its mask is None)

    def install_outputs(self, current: Callable[[], ClipCut | None]) -> list[Any]:
        """The projector runs on the kept rows; its output fills their slots, zeros elsewhere."""

        def before(module, args):
            cut = current()
            features = args[0]
            if cut is None or features.shape[1] == cut.index.shape[1] - 1:
                return None
            return (self.cut_hidden(_shift(cut), features), *args[1:])

        def after(module, args, output):
            cut = current()
            if cut is None:
                return None
            full = output.new_zeros(output.shape[0], self.side * self.side, output.shape[-1])
            rows = _on(cut.patches, output.device)
            return full.index_put_((self._image_rows(output.shape[0], output.device), rows), output)

        return [self.projector.register_forward_pre_hook(before), self.projector.register_forward_hook(after)]

    def call_flops(self, grid: torch.Tensor, cuts: list[tuple[int, ClipCut]]) -> list[float]:
        """Per image, the FLOPs of a call whose layers ran on every patch until the first cut, and
        from each cut's layer on (the projector after the last) on that cut's. cuts: (layer, cut) in order."""
        n_patches = self.side * self.side
        tokens = [n_patches + 1] * self.depth
        for block, cut in cuts:
            tokens[block:] = [cut.index.shape[1]] * (self.depth - block)
        kept = n_patches if not cuts else cuts[-1][1].index.shape[1] - 1
        text_hidden = self.config.text_config.hidden_size
        return [clip_cut_flops(self.vc, self.vc.hidden_size, text_hidden, n_patches, tokens, kept)] * grid.shape[0]


def _shift(cut: ClipCut | None) -> ClipCut | None:
    """The same cut (and chain) over features without [CLS]: indices of the kept patches only."""
    return None if cut is None else ClipCut(cut.mask, cut.patches, _shift(cut.parent), n_patches=cut.n_patches)


def _on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`, with no op when it is there already."""
    return tensor if tensor.device == device else tensor.to(device)
