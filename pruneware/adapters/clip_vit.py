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

from pruneware.adapters.vision_flops import clip_cut_flops
from pruneware.errors import PlanError


@dataclass
class ClipCut:
    """keep: [n * h * w] bool, row-major per image; index: [n, 1 + k] the rows kept ([CLS] first);
    parent: the earlier cut whose rows this one's layer receives (None: the full rows)."""

    keep: torch.Tensor
    index: torch.Tensor
    parent: ClipCut | None = None


class ClipVisionCut:
    """The `Adapter.vision_cut()` of LLaVA-1.5 (see `qwen_vit.QwenVisionCut` for the interface)."""

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
        return torch.tensor([[1, h, w]] * pixels.shape[0])

    def units(self, grid: torch.Tensor) -> list[tuple[int, int, int]]:
        return [tuple(row) for row in grid.tolist()]  # type: ignore[misc]

    def unit_features(self, hidden: torch.Tensor, grid: torch.Tensor, cut: ClipCut | None = None) -> torch.Tensor:
        """[n * h * w, d] the patches' states ([CLS] left out); hidden [n, 1 + h*w, d], or (after
        `cut`) [n, 1 + k, d] its kept rows, the other patches' states zeros."""
        patches = hidden[:, 1:].float()
        if cut is not None:
            full = patches.new_zeros(hidden.shape[0], int(grid[0, 1] * grid[0, 2]), hidden.shape[-1])
            rows = (cut.index[:, 1:] - 1).to(hidden.device)
            patches = full.scatter(1, rows[..., None].expand(-1, -1, hidden.shape[-1]), patches)
        return patches.reshape(-1, hidden.shape[-1])

    def full_parts(self, cut: ClipCut | None, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> list:
        """One layer's [CLS] attention reads ([n, k] scores, [n, k, d] keys), laid over every patch
        (zeros on the patches `cut` dropped), as `vision_image_scores` reads them."""
        if cut is None:
            return parts
        scores, keys = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        rows = (cut.index[:, 1:] - 1).to(scores.device)
        n = self.side * self.side
        full_scores = scores.new_zeros(scores.shape[0], n).scatter(1, rows, scores)
        full_keys = keys.new_zeros(keys.shape[0], n, keys.shape[-1]).scatter(
            1, rows[..., None].expand(-1, -1, keys.shape[-1]), keys)
        return [(full_scores, full_keys)]

    def pixel_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[n * h * w, C * P * P] each patch's pixels, row-major."""
        p = self.vc.patch_size
        n, c, height, width = pixels.shape
        x = pixels.float().view(n, c, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(-1, c * p * p)

    def cut(self, grid: torch.Tensor, keep: torch.Tensor, parent: ClipCut | None = None) -> ClipCut:
        per_image = keep.view(grid.shape[0], -1)
        counts = per_image.sum(dim=1).tolist()
        if len(set(counts)) > 1:
            raise ValueError(f"the images of one CLIP call must keep as many patches each, got {counts}")
        patches = per_image.nonzero()[:, 1].view(grid.shape[0], -1) + 1
        cls = torch.zeros(grid.shape[0], 1, dtype=torch.long, device=keep.device)
        return ClipCut(keep, torch.cat([cls, patches], dim=1), parent)

    def cut_hidden(self, cut: ClipCut, hidden: torch.Tensor) -> torch.Tensor:
        """[n, rows, d] -> [n, 1 + k, d] the kept rows; `rows` is the full 1 + h*w, or as many as
        an earlier cut of the chain kept (the feature layer may lie under any of them)."""
        source = cut.parent
        while source is not None and source.index.shape[1] != hidden.shape[1]:
            source = source.parent
        index = cut.index if source is None else torch.searchsorted(source.index, cut.index)
        return hidden.gather(1, index.to(hidden.device)[..., None].expand(-1, -1, hidden.shape[-1]))

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
            rows = (cut.index[:, 1:] - 1).to(output.device)
            return full.scatter(1, rows[..., None].expand(-1, -1, output.shape[-1]), output)

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
    return None if cut is None else ClipCut(cut.keep, cut.index[:, 1:] - 1, _shift(cut.parent))
