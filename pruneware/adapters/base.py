"""What pruneware needs to know about a model family, behind one small interface.

An adapter finds the decoder layers, the visual tokens (from token ids, never from offsets),
each image's token count and grid, and the kind of RoPE the language model uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from pruneware.adapters.layout import VisualItem, VisualLayout, items_to_layout
from pruneware.adapters.rope_tables import rope_tables
from pruneware.errors import PlanError

__all__ = ["Adapter", "VisualInjections", "VisualItem", "VisualLayout", "items_to_layout"]


@dataclass
class VisualInjections:
    """Features a model adds to the visual tokens' hidden states after its first decoder layers
    (Qwen3-VL DeepStack), kept in the model's own form so a pruned sequence can follow them.

    Attributes:
        mask: [B, L] bool, the language-model input positions that receive features.
        embeds: per layer i, [N, D] rows added after layer i to the masked positions, in
            row-major order (N = mask.sum()).
    """

    mask: torch.Tensor
    embeds: list[torch.Tensor]

    def add(self, hidden: torch.Tensor, layer: int, orig: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """hidden [B, Ls, D] after `layer`, whose slots hold input positions orig [B, Ls] (valid
        [B, Ls]): add the layer's rows of the slots still present, as the model itself would."""
        if layer >= len(self.embeds):
            return hidden
        mask = self.mask.to(hidden.device)
        rank = mask.flatten().long().cumsum(0).view_as(mask) - 1  # row of each masked position
        here = mask.gather(1, orig) & valid
        rows = self.embeds[layer].to(hidden.device, hidden.dtype)[rank.gather(1, orig)[here]]
        hidden = hidden.clone()
        hidden[here] = hidden[here] + rows
        return hidden


class Adapter:
    """Base class; one subclass per model family, registered by `config.model_type`."""

    model_types: ClassVar[tuple[str, ...]] = ()
    rope: ClassVar[Literal["1d", "mrope"]] = "1d"
    supports_merging: ClassVar[bool] = True  # merging policies (crosslmm) can run at `pre`
    resizes_pixels: ClassVar[bool] = False  # `resize` can lower the vision tower's input resolution
    # vLLM derives this family's head size as hidden_size / num_heads, ignoring `head_dim`
    # (vllm/model_executor/models/qwen2.py), so a checkpoint re-parametrised for another head size
    # must widen the residual stream too (pruneware.models.serving_layout).
    vllm_head_dim_from_width: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    @property
    def base_model(self) -> nn.Module:
        """The multimodal base model (vision tower + projector + language model)."""
        return self.model.model

    @property
    def language_model(self) -> nn.Module:
        return self.base_model.language_model

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def text_config(self) -> Any:
        return self.config.text_config

    def visual_token_ids(self) -> list[int]:
        raise NotImplementedError

    def pooled_positions(
        self, mm_token_type_ids: torch.Tensor, grids: list[list[tuple[int, int]]], attention_mask: torch.Tensor,
        second_per_grid_ts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """M-RoPE models: positions of merged tokens on pooled grids. 1-D RoPE models never call this."""
        raise NotImplementedError(f"{type(self).__name__} has no M-RoPE positions")

    def position_inputs(self, input_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> dict[str, Any]:
        """What `merged_positions` will need from the base model's forward (kept per request)."""
        return {}

    def merged_positions(
        self, inputs: dict[str, Any], index: torch.Tensor, valid: torch.Tensor, grids: list[list[tuple[int, int]]],
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Positions of a `pre` stage's output when a merging policy pooled grids (M-RoPE models).

        inputs: from `position_inputs`; index, valid: [B, L0] kept input positions and slot
        validity; grids: per sample, each unit's pooled grid; mask: [B, L0] the new 2-D mask.
        1-D RoPE models keep positions and never call this.
        """
        raise NotImplementedError(f"{type(self).__name__} has no M-RoPE positions")

    def vision_grid(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
        """The grid argument of one vision-tower call (see `vision_tower`)."""
        return kwargs.get("grid_thw", args[1] if len(args) > 1 else None)

    def host_grid(self, grid: torch.Tensor) -> list[list[int]]:
        """A grid tensor (e.g. `grid_thw` [n, 3]) on the host: one device read (a family whose
        forward reads the same grid tensor in several places memoises it)."""
        return grid.tolist()

    def rope_tables(self, like: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for `positions` [B, L] (or [3, B, L]), in `like`'s dtype and device (a 1-D RoPE
        in the ops that do something: `adapters/rope_tables.py`, the same values)."""
        rotary = self.language_model.rotary_emb
        return rope_tables(rotary, like, positions) if self.rope == "1d" else rotary(like, positions)

    def layer_group(self, layer: int) -> object:
        """Layers of one group share a pruned level's mask and RoPE tables; a family with
        per-layer attention types (e.g. sliding and full layers) returns each layer's type."""
        return 0

    def token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] int: 0 for text, nonzero (the modality) at visual placeholder tokens."""
        return torch.isin(input_ids, torch.tensor(self.visual_token_ids(), device=input_ids.device)).int()

    def vision_tower(self) -> nn.Module | None:
        """A module whose calls the session records as (output, `grid_thw`) pairs, passed to
        `layout` as `seen_vision` (dynamic-resolution models, whose grids `generate()` drops)."""
        return None

    def layout(self, input_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> VisualLayout:
        """Locate every image's tokens in `input_ids` [B, L].

        model_kwargs: the multimodal base model's forward kwargs, plus `seen_vision`.
        """
        raise NotImplementedError

    # the vision tower, for pre-LLM policies that read it (`Needs.vision`) ----
    def vision_encoder(self) -> nn.Module | None:
        """The module one call of which encodes a batch of images (None: not supported)."""
        return None

    def vision_score_attention(self) -> nn.Module:
        """The vision attention module whose rows vision-side policies read."""
        raise PlanError(
            f"{type(self).__name__} cannot read its vision tower's attention; policies that read it "
            "support LLaVA-1.5, Qwen2-VL and Qwen2.5-VL"
        )

    def vision_call_scores(
        self, query: torch.Tensor, key: torch.Tensor, scale: float | None, kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One call of `vision_score_attention`: (per-patch scores, per-patch keys averaged
        over heads) in the tower's own layout; `vision_image_scores` puts them in image order."""
        raise NotImplementedError

    def vision_image_scores(
        self, parts: list[tuple[torch.Tensor, torch.Tensor]], grid: torch.Tensor | None
    ) -> tuple[list[torch.Tensor] | torch.Tensor, list[torch.Tensor] | torch.Tensor]:
        """The parts one encoder call produced -> per image, in call order, its visual tokens'
        scores [n] and keys [n, d] (row-major over the token grid); or each as one tensor whose
        leading dims flatten to the images' tokens in call order ([n_images, n] when the images
        are alike, or [sum of n]; keys with a last dim d), which costs no split."""
        raise NotImplementedError

    def vision_cut(self) -> Any:
        """How `pre-vit` / `vitK` stages cut this family's vision tower (see `qwen_vit.QwenVisionCut`
        for the interface), or None when they are not supported."""
        return None

    # vision-side FLOPs (the formulas are in vision_flops.py) -----------------------------
    def tower_call_flops(self, args: tuple, kwargs: dict[str, Any]) -> list[float]:
        """Per image, the FLOPs of one call of `vision_encoder()` on the inputs it received
        ([] where a call does not show them per image)."""
        return []

    def input_vision_flops(self, inputs: dict[str, Any]) -> list[float]:
        """Per image, the vision-side FLOPs of a processor's `inputs` run unpruned."""
        return []

    def injection_layers(self) -> int:
        """n: the model adds features to the visual tokens after each of decoder layers 0..n-1."""
        return 0

    def take_injections(self, lm_kwargs: dict[str, Any]) -> VisualInjections | None:
        """Remove from the language model's prefill kwargs the per-layer features it would add
        to the visual tokens by position, and return them for the engine to add to the kept ones."""
        return None

    def _runs_to_layout(
        self, input_ids: torch.Tensor, sizes: list[int], grids: list[tuple[int, int]],
        rows: list[list[int]] | None = None,
    ) -> VisualLayout:
        """Cut the visual positions of each row, in reading order, into images of `sizes` tokens.
        rows: `input_ids.tolist()`, when the caller already read them."""
        token = self.visual_token_ids()[0]
        items = [VisualItem(token, (g,), (n,)) for n, g in zip(sizes, grids, strict=True)]
        return items_to_layout(input_ids, items, rows)
