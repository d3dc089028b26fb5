"""What the Qwen vision-language families share: dynamic resolution, images and video, M-RoPE.

Every image and every video frame is a *unit* with its own grid: `grid_thw` is (t, h, w) in
patches, a unit is one temporal step of (h / merge) x (w / merge) tokens, so a video of t steps
is t units and a stage's budget splits across its frames (and the sample's images) in
proportion. Units are numbered in order of appearance, images and videos interleaved, taking
grids from `image_grid_thw` and `video_grid_thw` in order. Positions (temporal ones included)
are kept as the model computed them: 3-D ([3, B, L], or [4, B, L] with the text positions first
under `generate`).
"""

from __future__ import annotations

import itertools
from functools import partial
from typing import Any, ClassVar

import torch

from pruneware.adapters.base import Adapter, VisualItem, VisualLayout, items_to_layout
from pruneware.adapters.vision import bin_firsts, mean_attention_received
from pruneware.adapters.qwen_positions import pooled_mrope_positions
from pruneware.adapters.qwen_vit import QwenVisionCut
from pruneware.adapters.vision_flops import QwenTower, qwen_image_flops

MODALITIES = ("image", "video")


class QwenVLAdapter(Adapter):
    """Shared base of the Qwen2-VL, Qwen2.5-VL and Qwen3-VL adapters (not registered itself)."""

    rope: ClassVar = "mrope"
    resizes_pixels: ClassVar = True

    def visual_token_ids(self) -> list[int]:
        return [self.config.image_token_id, self.config.video_token_id]

    def token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] int: 0 text, 1 image, 2 video, as Qwen processors build `mm_token_type_ids`."""
        return (input_ids == self.config.image_token_id).int() + 2 * (input_ids == self.config.video_token_id).int()

    def vision_tower(self) -> torch.nn.Module:
        return self.base_model.visual

    def vision_encoder(self) -> torch.nn.Module:
        return self.base_model.visual

    def tower_shape(self) -> QwenTower:
        """The vision tower's widths for its FLOPs (Qwen2.5-VL and Qwen3-VL; Qwen2-VL overrides)."""
        vc = self.config.vision_config
        return QwenTower(vc.hidden_size, vc.intermediate_size, vc.out_hidden_size)

    def image_flops(self, t: int, h: int, w: int) -> float:
        """The vision tower on one image or video of (t, h, w) patches."""
        return qwen_image_flops(self.config.vision_config, self.tower_shape(), t, h, w)

    def tower_call_flops(self, args: tuple, kwargs: dict[str, Any]) -> list[float]:
        # args (pixel_values, grid_thw) or grid_thw by keyword: one entry per grid row
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid is None:
            return []
        return [self.image_flops(t, h, w) for t, h, w in self.host_grid(grid)]  # the layout's read, when it had it

    def input_vision_flops(self, inputs: dict[str, Any]) -> list[float]:
        grids = [g for g in (inputs.get("image_grid_thw"), inputs.get("video_grid_thw")) if g is not None]
        return self.tower_call_flops((None, torch.cat(grids)), {}) if grids else []

    def vision_cut(self) -> QwenVisionCut:
        return QwenVisionCut(self.base_model.visual, self.tower_shape(), self.host_grid)

    def vision_score_attention(self) -> torch.nn.Module:
        """The attention of the last full-attention ViT block (Qwen2.5-VL's others are windowed)."""
        visual = self.base_model.visual
        full = getattr(visual, "fullatt_block_indexes", None)
        return visual.blocks[full[-1] if full else len(visual.blocks) - 1].attn

    def vision_call_scores(self, query, key, scale, kwargs):
        # query, key: [1, H, n, d], the patches of one attention call: one image or frame
        # (sdpa, eager), or every image packed with cu_seq_lens_q (flash attention).
        # frame_lengths: each frame's patch rows, from the host grid when the caller knows the call ran
        # uncut (they are the packed bounds then: no read of cu_seq_lens_q).
        bounds, lengths = kwargs.get("cu_seq_lens_q"), kwargs.get("frame_lengths")
        if bounds is None:
            lengths = [query.shape[2]]
        elif lengths is None or sum(lengths) != query.shape[2]:
            lengths = (bounds[1:] - bounds[:-1]).tolist()
        if len(lengths) == 1:  # one frame: the whole call, no slicing and no cat
            scores = mean_attention_received(query, key, scale)[0]
        else:
            starts = [0, *itertools.accumulate(lengths)]
            scores = torch.cat([
                mean_attention_received(query[:, :, a:b], key[:, :, a:b], scale)[0]
                for a, b in zip(starts[:-1], starts[1:], strict=True)
            ])
        keys = key[0] if key.dtype == torch.float32 else key[0].float()
        return scores, keys.mean(dim=0)

    def window_index(self, grid: torch.Tensor) -> torch.Tensor | None:
        """The order in which the ViT holds the merged patch groups (None: row-major)."""
        return None

    def window_order(self, grid: torch.Tensor, device: torch.device | None = None) -> torch.Tensor | None:
        """The inverse of `window_index(grid)` (tower order -> row-major: row-major item j is tower
        item `order[j]`) on `device` (default: the grid's), computed once per grid shape from the
        grid's host copy (`host_grid`: no device read; never written to)."""
        rows = self.host_grid(grid)
        device = grid.device if device is None else device
        memo = self.__dict__.setdefault("_window_orders", {})
        key = (tuple(map(tuple, rows)), str(device), torch.is_inference_mode_enabled())
        if key not in memo:
            if len(memo) > 64:  # a bounded memo: many distinct shapes just recompute
                memo.clear()
            order = self.window_index(torch.tensor(rows, dtype=grid.dtype))
            memo[key] = None if order is None else order.argsort().to(device)
        return memo[key]

    def vision_image_scores(self, parts, grid):
        """Mean over each merged group of patches (a visual token), back in row-major order."""
        unit = self.config.vision_config.spatial_merge_size ** 2
        scores = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts])
        keys = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts])
        scores = scores.view(-1, unit).mean(dim=1)
        keys = keys.view(-1, unit, keys.shape[-1]).mean(dim=1)
        to_row_major = self.window_order(grid, scores.device)
        if to_row_major is not None:  # a permutation: the same values, row-major
            scores, keys = scores[to_row_major], keys[to_row_major]
        return scores, keys  # [sum of n], [sum of n, d]: the images' tokens in call order

    def token_grid(self, h: int, w: int) -> tuple[int, int]:
        """The visual-token grid of an image of (h, w) patches."""
        merge = self.config.vision_config.spatial_merge_size
        return h // merge, w // merge

    @property
    def pixel_factor(self) -> int:
        """Pixels per visual-token side (patch x merge): the `factor` of Qwen's `smart_resize`."""
        vc = self.config.vision_config
        return int(vc.patch_size * vc.spatial_merge_size)

    def resize_pixels(
        self, pixels: torch.Tensor, grid: torch.Tensor, targets: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Resample each image's patches to a (ph, pw)-token grid, as if the processor had made it.

        pixels: [sum t*h*w, C*tp*P*P] in the processor's patch order; grid: [n, 3] (t, h, w);
        targets: the token grid of each image. Returns the new pixels and grid_thw.
        """
        vc = self.config.vision_config
        m, p, tp = vc.spatial_merge_size, vc.patch_size, vc.temporal_patch_size
        out, new_grid, start = [], [], 0
        for (t, h, w), (ph, pw) in zip(self.host_grid(grid), targets, strict=True):
            x = pixels[start : start + t * h * w]
            start += t * h * w
            if (ph * m, pw * m) == (h, w):
                out.append(x)
                new_grid.append([t, h, w])
                continue
            if t != 1:
                raise ValueError("resize resamples images, not video: give video inputs another plan")
            c = x.shape[1] // (tp * p * p)
            # [h/m, w/m, m, m, C, tp, P, P] -> one temporal copy -> [C, h*P, w*P]
            image = x.view(h // m, w // m, m, m, c, tp, p, p)[:, :, :, :, :, 0]
            image = image.permute(4, 0, 2, 5, 1, 3, 6).reshape(c, h * p, w * p)
            small = torch.nn.functional.interpolate(
                image[None].float(), size=(ph * m * p, pw * m * p), mode="bicubic", align_corners=False, antialias=True,
            )[0].to(x.dtype)
            patches = small.view(c, ph, m, p, pw, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # [ph, pw, m, m, C, P, P]
            patches = patches.unsqueeze(5).expand(-1, -1, -1, -1, -1, tp, -1, -1)
            out.append(patches.reshape(ph * m * pw * m, c * tp * p * p))
            new_grid.append([t, ph * m, pw * m])
        resized = torch.tensor(new_grid, dtype=grid.dtype, device=grid.device)
        self.remember_grid(resized, new_grid)  # its host copy: the tower's FLOPs read it
        return torch.cat(out), resized

    def spread_tokens(
        self, features: torch.Tensor, grid: torch.Tensor, targets: list[tuple[int, int]]
    ) -> torch.Tensor:
        """[sum ph*pw, D] tokens of resized images -> [sum h*w/m^2, D] over the input's grids,
        each at its bin's first slot, zeros elsewhere (the `pre` stage keeps only those slots)."""
        out, start = [], 0
        for (t, h, w), (ph, pw) in zip(self.host_grid(grid), targets, strict=True):
            hh, ww = self.token_grid(h, w)
            rows = features[start : start + ph * pw]
            start += ph * pw
            full = features.new_zeros(t * hh * ww, features.shape[-1])
            full[bin_firsts(hh, ww, ph, pw).to(features.device)] = rows
            out.append(full)
        return torch.cat(out)

    def layout(self, input_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> VisualLayout:
        merge = self.config.vision_config.spatial_merge_size
        grids = {modality: self._grid_thw(model_kwargs, modality) for modality in MODALITIES}
        rows, host_grids = self._read_ids_and_grids(input_ids, grids)
        items = []
        for modality in MODALITIES:
            token = getattr(self.config, f"{modality}_token_id")
            if host_grids[modality] is None:
                if any(token in row for row in rows):
                    raise ValueError(f"input_ids hold {modality} tokens but no {modality}_grid_thw was given")
                continue
            for t, h, w in host_grids[modality]:
                grid = (h // merge, w // merge)
                items.append(VisualItem(token, (grid,) * t, (grid[0] * grid[1],) * t))
        return items_to_layout(input_ids, items, rows)

    def _read_ids_and_grids(
        self, input_ids: torch.Tensor, grids: dict[str, torch.Tensor | None],
    ) -> tuple[list[list[int]], dict[str, list[list[int]] | None]]:
        """input_ids [B, L] and each modality's grid_thw [n, 3] on the host, in the layout's one
        host read (one cat of the flattened tensors, one op); a grid read before (the vision
        tower's units, `host_grid`) is not read again."""
        host = {m: None if grid is None else self.host_grid(grid, read=False) for m, grid in grids.items()}
        unread = [(m, grid) for m, grid in grids.items() if grid is not None and host[m] is None]
        parts = [input_ids.reshape(-1)]
        for _, grid in unread:
            same = grid.device == input_ids.device and grid.dtype == input_ids.dtype
            parts.append(grid.reshape(-1) if same else grid.reshape(-1).to(input_ids.device, input_ids.dtype))
        flat = (torch.cat(parts) if len(parts) > 1 else parts[0]).tolist()
        batch, length = input_ids.shape
        rows = [flat[b * length : (b + 1) * length] for b in range(batch)]
        at = batch * length
        for modality, grid in unread:
            values, at = flat[at : at + grid.numel()], at + grid.numel()
            host[modality] = self.remember_grid(grid, [values[i : i + 3] for i in range(0, len(values), 3)])
        return rows, host

    def host_grid(self, grid: torch.Tensor, read: bool = True) -> list[list[int]] | None:  # type: ignore[override]
        """grid_thw [n, 3] on the host, read once per tensor: the layout, the vision tower's cut,
        its FLOPs and `resize`'s resampling get the same tensor in one forward (`image_grid_thw`),
        so only the first asks for a sync. read=False: None when it was not read yet."""
        for seen, values in self.__dict__.get("_host_grids", ()):
            if seen is grid:
                return values
        return self.remember_grid(grid, grid.tolist()) if read else None

    def remember_grid(self, grid: torch.Tensor, values: list[list[int]]) -> list[list[int]]:
        """Keep `values`, the host copy of `grid`, for `host_grid` (the last four grids)."""
        self.__dict__["_host_grids"] = [(grid, values), *self.__dict__.get("_host_grids", ())][:4]
        return values

    @staticmethod
    def _grid_thw(model_kwargs: dict[str, Any], modality: str) -> torch.Tensor | None:
        """The (t, h, w) grids of one modality, from the inputs or, under `generate()` (which
        encodes pixels first and drops the grids), from the vision-tower calls the session saw."""
        grid = model_kwargs.get(f"{modality}_grid_thw")
        if grid is not None:
            return grid
        output = (model_kwargs.get("mm_encoder_outputs") or {}).get(modality)
        if output is None:
            return None
        for seen, seen_grid in model_kwargs.get("seen_vision", ()):
            if seen is output:
                return seen_grid
        raise ValueError(
            f"precomputed {modality} features (mm_encoder_outputs) came without {modality}_grid_thw: "
            f"pass {modality}_grid_thw too, or encode the pixels inside the pruneware session"
        )

    def position_inputs(self, input_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> dict[str, Any]:
        return {"input_ids": input_ids, "mm_token_type_ids": model_kwargs.get("mm_token_type_ids"),
                "second_per_grid_ts": model_kwargs.get("second_per_grid_ts")}

    def merged_positions(
        self, inputs: dict[str, Any], index: torch.Tensor, valid: torch.Tensor, grids: list[list[tuple[int, int]]],
        mask: torch.Tensor,
    ) -> torch.Tensor:
        types = inputs["mm_token_type_ids"]
        types = self.token_types(inputs["input_ids"]) if types is None else types
        types = types.to(index.device).gather(1, index) * valid
        return self.pooled_positions(types, grids, mask, inputs["second_per_grid_ts"])

    def video_time_interval(self, video: int, second_per_grid_ts: torch.Tensor | None) -> float:
        """Temporal position step between a video's grid steps (Qwen2-VL: 1)."""
        return 1.0

    def pooled_positions(
        self, mm_token_type_ids: torch.Tensor, grids: list[list[tuple[int, int]]], attention_mask: torch.Tensor,
        second_per_grid_ts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """M-RoPE positions [3, B, L] for merged tokens laid out on pooled grids.

        As the model's own `get_rope_index` would give them for a genuinely lower-resolution
        input: text counts up by one; an image (or a video time step: its temporal position is
        kept) is laid out on its pooled (h, w) grid from the current position; the text after it
        continues from there plus the grid's larger side, as for a smaller image.
        mm_token_type_ids: [B, L] (0 text, 1 image, 2 video); grids: per sample, the pooled grid
        of each unit (image or video time step) in order of appearance.
        """
        interval = partial(self.video_time_interval, second_per_grid_ts=second_per_grid_ts)
        return pooled_mrope_positions(mm_token_type_ids, grids, attention_mask, interval)
