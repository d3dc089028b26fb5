"""Cutting LLaVA-NeXT's CLIP tower between layers (`vitK`, `pre-vit`): `ClipVisionCut` for anyres tiles.

One tower call encodes every tile of a batch ([T, C, side*p, side*p]): per image, its base tile
(the whole picture) then its high-res crops. A *unit* is one visual token the language model
would receive, i.e. one patch of the base tile or of the high-res grid after unpadding; each
image is one row of the policy's batch with two frames, the base grid (side x side) and the
unpadded high-res grid (h x w) in the order `pack_image_features` writes them. That is the
layout a `pre` stage sees (`LlavaNextAdapter.layout`: the same two units, the same budget,
split over them in proportion), so `divprune@vitK:k` and `divprune@pre:k` keep comparable sets.
Patches that unpadding removes are not units: no policy sees them and they never count as kept.
Newline rows are added after the projector, so a vision-side stage never prunes them.

From layer K on, each tile runs [CLS] plus its kept patches (tiles keep different counts: the
call is padded to the largest, and the padded rows are masked out of every attention); an image
whose units are all kept keeps its tiles whole, so keep-all is the unpruned tower bit for bit.
The feature layer is read from the rows of the cut its layer ran under, the projector runs on
the kept rows, and its output is spread back over each tile's patch slots (zeros elsewhere), so
HF's own unpadding and newline rows still fill the placeholders; the engine then keeps the
units' positions as a `pre` stage with the same kept set would.

The tower call does not show which tiles make which image: while a session holds the cut,
`get_image_features` notes its `image_sizes` for the tower call it makes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from pruneware.adapters.vision_flops import clip_cut_flops
from pruneware.errors import PlanError

# image_sizes [n, 2] of the `get_image_features` call in flight (set and reset around it)
_IMAGE_SIZES: ContextVar[torch.Tensor | None] = ContextVar("pruneware_llava_next_image_sizes", default=None)


@dataclass(frozen=True)
class NextGrid:
    """One tower call's units. frames: per image, the (h, w) grid of its base and high-res units;
    unit_tile, unit_patch: [n_units] the tile (in the call) and patch (row-major in the tile) of
    each unit, image after image; tile_image: [T] the image of each tile."""

    frames: list[list[tuple[int, int]]]
    unit_tile: torch.Tensor
    unit_patch: torch.Tensor
    tile_image: torch.Tensor


@dataclass
class NextCut:
    """keep: [n_units] bool over the call's units; index: [T, R] the rows each tile keeps ([CLS]
    first, then its kept patches + 1; padding rows repeat [CLS]); valid: [T, R] bool, None when no
    tile is padded; parent: the earlier cut whose rows this one's layer receives; block: the layer
    it cuts before (noted when that layer runs)."""

    keep: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor | None
    parent: NextCut | None = None
    block: int | None = None
    masks: dict = field(default_factory=dict)  # dtype -> mask, built at the first layer that needs it

    def mask(self, dtype: torch.dtype) -> torch.Tensor:
        """[T, 1, 1, R] additive attention mask: 0 on real rows, the dtype's minimum on padding."""
        assert self.valid is not None
        if dtype not in self.masks:
            self.masks[dtype] = torch.zeros(self.valid.shape, dtype=dtype, device=self.valid.device).masked_fill_(
                ~self.valid, torch.finfo(dtype).min)[:, None, None]
        return self.masks[dtype]

    def positions_in(self, source: NextCut | None, width: int) -> torch.Tensor:
        """[T, R] where this cut's rows sit among `source`'s rows (None: the full 1 + side^2 rows, `width`)."""
        if source is None:
            return self.index
        lookup = torch.zeros(source.index.shape[0], width + 1, dtype=torch.long, device=source.index.device)
        rows = source.index if source.valid is None else source.index.masked_fill(~source.valid, width)
        lookup.scatter_(1, rows, torch.arange(rows.shape[1], device=rows.device).expand_as(rows))
        return lookup.gather(1, self.index)


class NextVisionCut:
    """The `Adapter.vision_cut()` of LLaVA-NeXT (see `qwen_vit.QwenVisionCut` for the interface)."""

    def __init__(self, config: Any, base_model: torch.nn.Module):
        layer = config.vision_feature_layer
        if config.vision_feature_select_strategy != "default" or not isinstance(layer, int):
            raise PlanError(
                "vision-side stages on LLaVA-NeXT need a [CLS] token outside the visual tokens and one feature "
                f"layer: vision_feature_select_strategy='default' (got {config.vision_feature_select_strategy!r}) "
                f"and an integer vision_feature_layer (got {layer!r})"
            )
        self.config, self.vc, self.base_model = config, config.vision_config, base_model
        tower = base_model.vision_tower
        self.layers = getattr(tower, "vision_model", tower).encoder.layers
        self.full_blocks = set(range(len(self.layers)))
        self.side = self.vc.image_size // self.vc.patch_size
        # the layer whose output the projector reads (hidden_states[v]: layer v - 1's output); -1: the embeddings
        self.feature_block = len(self.layers) + layer if layer < 0 else layer - 1
        self._grids: dict[tuple, NextGrid] = {}

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def blocks(self) -> torch.nn.ModuleList:
        return self.layers

    def attention(self, block: int) -> torch.nn.Module:
        return self.layers[block].self_attn

    # the call's units ------------------------------------------------------------------------
    def call_grid(self, args: tuple, kwargs: dict) -> NextGrid:
        pixels = args[0] if args else kwargs["pixel_values"]
        sizes = _IMAGE_SIZES.get()
        if sizes is None:
            raise ValueError("vision-side stages on LLaVA-NeXT need the tower called by the model's get_image_features "
                             "(inside the pruneware session), which tells which tiles make each image")
        return self.grid(sizes.tolist(), pixels.shape[0], pixels.device)

    def grid(self, sizes: list[list[int]], n_tiles: int, device: torch.device) -> NextGrid:
        """The units of a call over the tiles of images of `sizes` (height, width) px, as HF packs them."""
        key = (tuple(map(tuple, sizes)), n_tiles, str(device))
        if key not in self._grids:
            if len(self._grids) > 64:  # a bounded memo: many distinct batches just rebuild
                self._grids.clear()
            self._grids[key] = self._build_grid(sizes, n_tiles, device)
        return self._grids[key]

    def _build_grid(self, sizes: list[list[int]], n_tiles: int, device: torch.device) -> NextGrid:
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        side, tile_px, area = self.side, self.vc.image_size, self.side * self.side
        frames, tiles, patches, tile_image, first = [], [], [], [], 0
        for image, size in enumerate(sizes):
            rows, cols = get_anyres_image_grid_shape(size, self.config.image_grid_pinpoints, tile_px)
            # HF's own unpadding, run on patch ids: [rows*side, cols*side] -> the kept (h, w) block
            ids = torch.arange(rows * cols * area).view(rows, cols, side, side).permute(0, 2, 1, 3)
            high = unpad_image(ids.reshape(1, rows * side, cols * side), size)[0]
            frames.append([(side, side), tuple(high.shape)])
            base = torch.arange(area)
            tiles += [torch.full((area,), first), first + 1 + high.reshape(-1) // area]
            patches += [base, high.reshape(-1) % area]
            tile_image.append(torch.full((1 + rows * cols,), image))
            first += 1 + rows * cols
        if first != n_tiles:
            raise ValueError(f"image_sizes {sizes} make {first} tiles but the vision tower received {n_tiles}")
        return NextGrid(frames, torch.cat(tiles).to(device), torch.cat(patches).to(device),
                        torch.cat(tile_image).to(device))

    def units(self, grid: NextGrid) -> list[tuple[int, int, int]]:
        """Per image (1, 1, n): its n units as one run (`frames` gives their two grids)."""
        return [(1, 1, sum(h * w for h, w in f)) for f in grid.frames]

    def call_units(self, grid: NextGrid, args: tuple, kwargs: dict) -> list[tuple[int, int, int]]:
        return self.units(grid)

    def frames(self, grid: NextGrid) -> list[list[tuple[int, int]]]:
        """Per image, the (h, w) grids of its base and high-res units: its frames in the policy's batch."""
        return grid.frames

    def _spread(self, rows: torch.Tensor, cut: NextCut | None, width: int) -> torch.Tensor:
        """[T, R, ...] a cut's rows -> [T, width, ...] over every row (zeros on the others)."""
        if cut is None:
            return rows
        index = cut.index if cut.valid is None else cut.index.masked_fill(~cut.valid, width)
        full = rows.new_zeros(rows.shape[0], width + 1, *rows.shape[2:])
        index = index.to(rows.device).view(*index.shape, *[1] * (rows.dim() - 2)).expand_as(rows)
        return full.scatter_(1, index, rows)[:, :width]

    def unit_features(self, hidden: torch.Tensor, grid: NextGrid, cut: NextCut | None = None) -> torch.Tensor:
        """[n_units, d] each unit's state; hidden [T, 1 + side^2, d], or [T, R, d] after `cut`."""
        full = self._spread(hidden.float(), cut, 1 + self.side * self.side)
        return full[grid.unit_tile, 1 + grid.unit_patch]

    def pixel_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[n_units, C * P * P] each unit's pixels (the call's grid from the sizes in flight)."""
        p = self.vc.patch_size
        grid = self.call_grid((pixels,), {})
        t, c, height, width = pixels.shape
        x = pixels.float().view(t, c, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(t, -1, c * p * p)[grid.unit_tile, grid.unit_patch]

    def full_parts(self, cut: NextCut | None, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> list:
        """[CLS] attention reads ([T, side^2] scores, [T, side^2, d] keys), per tile; the grid maps them to units."""
        if cut is not None:
            raise PlanError("on LLaVA-NeXT a vision-side stage that reads the tower's attention must be the first "
                            "vision-side stage (after a cut the tiles are padded, and the reads would see the padding)")
        return parts

    # the cut ---------------------------------------------------------------------------------
    def cut(self, grid: NextGrid, keep: torch.Tensor, parent: NextCut | None = None) -> NextCut:
        """The rows each tile keeps: [CLS] and the patches of its kept units; every row of a tile
        whose image keeps all its units (its padding patches too)."""
        area, n_tiles = self.side * self.side, grid.tile_image.shape[0]
        tile_keep = torch.zeros(n_tiles, area, dtype=torch.bool, device=keep.device)
        tile_keep[grid.unit_tile[keep], grid.unit_patch[keep]] = True
        sizes = torch.tensor([n for _, _, n in self.units(grid)], device=keep.device)
        image_of_unit = torch.repeat_interleave(torch.arange(len(grid.frames), device=keep.device), sizes)
        dropped = torch.zeros(len(grid.frames), dtype=torch.long, device=keep.device).index_add_(
            0, image_of_unit, (~keep).long())
        tile_keep |= (dropped == 0)[grid.tile_image][:, None]
        counts = tile_keep.sum(dim=1)
        width = int(counts.max())  # the call's one host read
        order = torch.sort((~tile_keep).to(torch.uint8), dim=1, stable=True).indices[:, :width] + 1
        valid = torch.arange(width, device=keep.device) < counts[:, None]
        index = torch.cat([order.new_zeros(n_tiles, 1), order.masked_fill(~valid, 0)], dim=1)
        padded = not bool(valid.all())
        return NextCut(keep, index, torch.cat([valid.new_ones(n_tiles, 1), valid], 1) if padded else None, parent)

    def cut_rows(self, grid: NextGrid, units: list[tuple[int, int, int]], rows: torch.Tensor,
                 parent: NextCut | None = None) -> NextCut:
        """`cut` from [n_images, k] kept unit indices per image."""
        keep = torch.zeros(len(units), units[0][2], dtype=torch.bool, device=rows.device).scatter_(1, rows, True)
        return self.cut(grid, keep.view(-1), parent)

    def cut_hidden(self, cut: NextCut, hidden: torch.Tensor) -> torch.Tensor:
        """[T, rows, d] (the parent cut's rows, or the full 1 + side^2) -> [T, R, d] this cut's rows."""
        index = cut.positions_in(cut.parent, 1 + self.side * self.side).to(hidden.device)
        return hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))

    def block_kwargs(self, cut: NextCut, block: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        while cut is not None and cut.block is None:  # the first layer a cut reaches is the one it cuts before
            cut.block, cut = block, cut.parent
        return {}  # the padding mask goes in through the attention's pre-hook (the layer takes it positionally)

    def install_outputs(self, current: Callable[[], NextCut | None]) -> list[Any]:
        """Hooks: `get_image_features` notes the image sizes; each attention masks a padded cut's
        padding; the projector runs on the last cut's kept rows and spreads its output over every
        patch slot of each tile (zeros elsewhere)."""
        area = self.side * self.side

        def mask(module, args, kwargs):
            cut = current()
            if cut is None or cut.valid is None:
                return None
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            return args, {**kwargs, "attention_mask": cut.mask(hidden.dtype).to(hidden.device)}

        def before(module, args):
            cut = current()
            if cut is None:
                return None
            source = cut  # the rows of the cut the feature layer ran under
            while source is not None and (source.block is None or source.block > self.feature_block):
                source = source.parent
            index = (cut.positions_in(source, 1 + area) - 1).clamp_(min=0)[:, 1:].to(args[0].device)
            return (args[0].gather(1, index[..., None].expand(-1, -1, args[0].shape[-1])), *args[1:])

        def after(module, args, output):
            cut = current()
            if cut is None:
                return None
            return self._spread(output, _shift(cut), area)

        handles = [layer.self_attn.register_forward_pre_hook(mask, with_kwargs=True) for layer in self.layers]
        projector = self.base_model.multi_modal_projector
        handles += [projector.register_forward_pre_hook(before), projector.register_forward_hook(after)]
        return [*handles, _SizesHandle(self.base_model)]

    def call_flops(self, grid: NextGrid, cuts: list[tuple[int, NextCut]]) -> list[float]:
        """Per image, the FLOPs its tiles ran: every layer on 1 + side^2 rows until the first cut,
        from each cut's layer on its padded width R, the projector on the last cut's R - 1 rows."""
        area = self.side * self.side
        tokens = [area + 1] * self.depth
        for block, cut in cuts:
            tokens[block:] = [cut.index.shape[1]] * (self.depth - block)
        kept = area if not cuts else cuts[-1][1].index.shape[1] - 1
        tile = clip_cut_flops(self.vc, self.vc.hidden_size, self.config.text_config.hidden_size, area, tokens, kept)
        return [tile * n for n in torch.bincount(grid.tile_image, minlength=len(grid.frames)).tolist()]


def _shift(cut: NextCut) -> NextCut:
    """The cut over projector rows ([CLS] left out): patch indices, padding marked invalid."""
    valid = cut.valid[:, 1:] if cut.valid is not None else None
    return NextCut(cut.keep, (cut.index[:, 1:] - 1).clamp(min=0), valid, None, cut.block)


class _SizesHandle:
    """Wraps the base model's `get_image_features` so the tower's call knows its images' sizes;
    `remove()` restores the class's own method."""

    def __init__(self, base_model: torch.nn.Module):
        self.base_model = base_model
        original = base_model.get_image_features

        @functools.wraps(original)
        def get_image_features(pixel_values, image_sizes, *args, **kwargs):
            token = _IMAGE_SIZES.set(image_sizes)
            try:
                return original(pixel_values, image_sizes, *args, **kwargs)
            finally:
                _IMAGE_SIZES.reset(token)

        self.wrapper = get_image_features
        base_model.get_image_features = get_image_features

    def remove(self) -> None:
        if self.base_model.__dict__.get("get_image_features") is self.wrapper:
            del self.base_model.get_image_features
