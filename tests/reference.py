"""Independent, straightforward references for pruned forwards, written without pruneware.

`record_lm_inputs` captures what the language model receives in an unpruned forward; the
reference then re-runs the decoder layers one by one in a plain loop, dropping rows at each
stage from a list of kept *original* positions, and recomputing RoPE from the positions.
"""

from __future__ import annotations

import torch
from transformers.masking_utils import create_causal_mask


def record_lm_inputs(model, inputs: dict) -> dict:
    """Run `model` unpruned and return the language model's inputs_embeds and position_ids."""
    seen: dict = {}

    def hook(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach().clone()
        seen["positions"] = kwargs.get("position_ids")
        seen["deepstack"] = kwargs.get("deepstack_visual_embeds")  # Qwen3-VL: [n_visual, D] per early layer
        seen["deepstack_mask"] = kwargs.get("visual_pos_masks")  # [1, L] bool

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return seen


def reference_logits(model, seen: dict, stages: list[tuple[int, torch.Tensor]], compact: bool = False) -> torch.Tensor:
    """Logits of one sample (batch 1) pruned in a plain layer loop.

    stages: (layer, kept original positions) pairs; layer 0 means before the first layer
    (a `pre` stage). Positions are the original ones, or re-indexed when `compact`. Qwen3-VL
    DeepStack features recorded with the inputs are added after their layers to the visual
    tokens still present.
    """
    lm = model.model.language_model
    hidden = seen["embeds"]
    length = hidden.shape[1]
    positions = seen["positions"]
    if positions is None:
        positions = torch.arange(length)[None]
    if positions.dim() == 3 and positions.shape[0] == 4:
        positions = positions[1:]
    origin = torch.arange(length)
    todo = dict(stages)
    for i, layer in enumerate(lm.layers):
        if i in todo:
            keep = torch.isin(origin, todo[i])
            hidden, positions, origin = hidden[:, keep], positions[..., keep], origin[keep]
            if compact:
                positions = torch.arange(hidden.shape[1])[None]
        cos_sin = lm.rotary_emb(hidden, positions)
        mask = create_causal_mask(
            config=lm.config, inputs_embeds=hidden, attention_mask=torch.ones(1, hidden.shape[1], dtype=torch.long),
            cache=None,
        )
        hidden = layer(hidden, attention_mask=mask, position_embeddings=cos_sin, position_ids=None)
        if seen.get("deepstack") is not None and i < len(seen["deepstack"]):
            # DeepStack: the layer's features for the visual positions still present, in order.
            visual = seen["deepstack_mask"][0]
            row_of = visual.long().cumsum(0) - 1  # input position -> row of the features
            present = visual[origin]
            hidden = hidden.clone()
            hidden[0, present] += seen["deepstack"][i][row_of[origin[present]]].to(hidden.dtype)
    return model.lm_head(lm.norm(hidden))


def kept_positions(input_ids: torch.Tensor, visual_ids: list[int], kept_visual: torch.Tensor) -> torch.Tensor:
    """All text positions of one sample plus its kept visual positions, sorted."""
    text = (~torch.isin(input_ids, torch.tensor(visual_ids))).nonzero().squeeze(1)
    return torch.cat([text, kept_visual]).sort().values
