"""Independent, straightforward references for pruned forwards, written without pruneware.

`record_lm_inputs` captures what the language model receives in an unpruned forward; the
reference then re-runs the decoder layers one by one in a plain loop, dropping rows at each
stage from a list of kept *original* positions, and recomputing RoPE from the positions.
"""

from __future__ import annotations

import torch
from transformers.masking_utils import create_causal_mask

from tests.tiny import IMAGE_TOKEN, PAD, VIDEO_TOKEN


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


def uncached_greedy(model, inputs, steps):
    """Greedy decoding by full recomputation (no cache): ids [B, L+steps], logits [B, steps, V]."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    out = []
    for _ in range(steps):
        kwargs = dict(extra)
        if "mm_token_type_ids" in inputs:
            kwargs["mm_token_type_ids"] = (ids == IMAGE_TOKEN).int() + 2 * (ids == VIDEO_TOKEN).int()
        with torch.no_grad():
            last = model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs).logits[:, -1]
        out.append(last)
        ids = torch.cat([ids, last.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids, torch.stack(out, 1)


def pad_batch(samples: list[dict]) -> dict:
    """Left-pad token tensors; concatenate pixels and grids (LLaVA-NeXT tiles padded to the most)."""
    length = max(s["input_ids"].shape[1] for s in samples)
    batch: dict = {}
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in samples[0]:
            batch[key] = torch.cat([torch.nn.functional.pad(s[key], (length - s[key].shape[1], 0)) for s in samples])
    batch["input_ids"][batch["attention_mask"] == 0] = PAD
    for key in ("image_grid_thw", "video_grid_thw", "image_sizes", "pixel_values_videos"):
        if any(key in s for s in samples):
            batch[key] = torch.cat([s[key] for s in samples if key in s])
    pixels = [s["pixel_values"] for s in samples if "pixel_values" in s]
    if pixels and pixels[0].dim() == 5:
        tiles = max(p.shape[1] for p in pixels)
        pixels = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, tiles - p.shape[1])) for p in pixels]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    return batch
