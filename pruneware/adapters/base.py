"""What pruneware needs to know about a model family, behind one small interface.

An adapter finds the decoder layers, the visual tokens (from token ids, never from offsets),
each image's token count and grid, and the kind of RoPE the language model uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn


@dataclass(frozen=True)
class VisualLayout:
    """Where the visual tokens of a batch are.

    Attributes:
        image_ids: [B, L] long: for each input position, the index (within its sample) of the
            image or frame it belongs to, or -1 for text and padding.
        grids: per sample, the (height, width) token grid of each image, in order.
    """

    image_ids: torch.Tensor
    grids: list[list[tuple[int, int]]]

    @property
    def visual(self) -> torch.Tensor:
        """[B, L] bool: True at visual-token positions."""
        return self.image_ids >= 0


class Adapter:
    """Base class; one subclass per model family, registered by `config.model_type`."""

    model_types: ClassVar[tuple[str, ...]] = ()
    rope: ClassVar[Literal["1d", "mrope"]] = "1d"

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
        self, mm_token_type_ids: torch.Tensor, grids: list[list[tuple[int, int]]], attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """M-RoPE models: positions of merged tokens on pooled grids. 1-D RoPE models never call this."""
        raise NotImplementedError(f"{type(self).__name__} has no M-RoPE positions")

    def vision_tower(self) -> nn.Module | None:
        """A module whose input `grid_thw` the session records (dynamic-resolution models)."""
        return None

    def layout(self, input_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> VisualLayout:
        """Locate every image's tokens in `input_ids` [B, L]."""
        raise NotImplementedError

    def _runs_to_layout(
        self, input_ids: torch.Tensor, sizes: list[int], grids: list[tuple[int, int]]
    ) -> VisualLayout:
        """Cut the visual positions of each row, in reading order, into images of `sizes` tokens."""
        visual = torch.isin(input_ids, torch.tensor(self.visual_token_ids(), device=input_ids.device))
        image_ids = torch.full_like(input_ids, -1)
        per_sample: list[list[tuple[int, int]]] = []
        cursor, counts = 0, visual.sum(dim=1).tolist()
        for b, n in enumerate(counts):
            positions = visual[b].nonzero().squeeze(1)
            taken, image, sample_grids = 0, 0, []
            while taken < n:
                if cursor >= len(sizes):
                    raise ValueError(
                        f"sample {b} has {n} visual tokens, more than the images given account for"
                    )
                size = sizes[cursor]
                image_ids[b, positions[taken : taken + size]] = image
                sample_grids.append(grids[cursor])
                taken, image, cursor = taken + size, image + 1, cursor + 1
            if taken != n:
                raise ValueError(f"sample {b}: {n} visual tokens do not split into whole images of sizes {sizes}")
            per_sample.append(sample_grids)
        return VisualLayout(image_ids, per_sample)
