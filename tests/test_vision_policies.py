"""Pre-LLM policies that read the vision tower pick what a hand computation on the tower's own
eager attention weights picks: padded batches, several images, generate with a cache."""

from __future__ import annotations

import importlib

import pytest
import torch
from transformers.vision_utils import get_vision_window_index

import pruneware
from pruneware.policies import split_budget
from tests.reference import uncached_greedy
from tests.tiny import IMAGE_TOKEN, llava_inputs, qwen_inputs, tiny_llava, tiny_qwen

LLAVA_SAMPLES = [(5, 1, 9), (3, 2, 4), (2, 1, 12)]
QWEN_SAMPLES = [(4, [(8, 12)], 9), (2, [(4, 8), (8, 8)], 3), (6, [(12, 8)], 2)]


def make(family: str, attn: str = "eager", feature_layer: int = -1):
    if family == "llava":
        model = tiny_llava(attn)
        model.config.vision_feature_layer = feature_layer
        return model, llava_inputs(model, LLAVA_SAMPLES)
    model = tiny_qwen(attn)
    return model, qwen_inputs(model, QWEN_SAMPLES)


def record_eager_weights(model, monkeypatch, family: str) -> tuple[list[torch.Tensor], torch.nn.Module]:
    """Run the vision tower in eager mode and keep the attention probabilities that
    transformers' own eager function returns at the layer the policies read."""
    if family == "llava":
        layer = model.config.vision_feature_layer
        layers = model.model.vision_tower.encoder.layers
        target = layers[len(layers) + layer if layer < 0 else layer - 1].self_attn
        module = importlib.import_module("transformers.models.clip.modeling_clip")
    else:
        visual = model.model.visual
        target = visual.blocks[visual.fullatt_block_indexes[-1]].attn
        module = importlib.import_module("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")
    seen: list[torch.Tensor] = []
    original = module.eager_attention_forward

    def recording(mod, *args, **kwargs):
        out, weights = original(mod, *args, **kwargs)
        if mod is target:
            seen.append(weights.detach())
        return out, weights

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    return seen, target


def image_scores_by_hand(model, inputs, monkeypatch, family: str) -> list[torch.Tensor]:
    """Per image (in batch order), the score of each of its visual tokens."""
    model.set_attn_implementation({"vision_config": "eager"})
    seen, _ = record_eager_weights(model, monkeypatch, family)
    with torch.no_grad():
        if family == "llava":
            model.model.vision_tower(inputs["pixel_values"])
            (weights,) = seen  # [n_images, H, 1 + n, 1 + n]
            return list(weights[:, :, 0, 1:].mean(dim=1))  # [CLS] row, mean over heads
        visual = model.model.visual
        grid = inputs["image_grid_thw"]
        visual(inputs["pixel_values"], grid_thw=grid)
    # One chunk per image: [1, H, n, n]; mean over heads and query rows = attention received.
    received = torch.cat([w[0].mean(dim=0).mean(dim=0) for w in seen])  # patches, in window order
    groups = received.view(-1, visual.spatial_merge_size**2).mean(dim=1)
    window = get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size, visual.patch_size)[0]
    ordered = torch.empty_like(groups)
    ordered[window] = groups
    return list(ordered.split((grid.prod(-1) // visual.spatial_merge_size**2).tolist()))


def top_by_hand(inputs, per_image: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """Per sample, the kept input positions: top-k per image under the split budget."""
    out, image = [], 0
    for ids in inputs["input_ids"]:
        positions = (ids == IMAGE_TOKEN).nonzero().squeeze(1)
        sizes = []
        while sum(sizes) < len(positions):
            sizes.append(len(per_image[image + len(sizes)]))
        kept, start = [], 0
        for size, k in zip(sizes, split_budget(sizes, count), strict=True):
            scores = per_image[image]
            kept.append(positions[start + scores.topk(k).indices])
            start += size
            image += 1
        out.append(torch.cat(kept).sort().values)
    return out


@pytest.mark.parametrize("family,feature_layer", [("llava", -1), ("llava", -2), ("qwen", -1)])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_fastervlm_matches_hand_computation(family, feature_layer, backend, monkeypatch):
    model, inputs = make(family, "eager", feature_layer)
    expected = top_by_hand(inputs, image_scores_by_hand(model, inputs, monkeypatch, family), 7)
    monkeypatch.undo()
    model.set_attn_implementation(backend)
    with pruneware.prune(model, "fastervlm@pre:7") as run:
        with torch.no_grad():
            model(**inputs)
    kept = run.report.stages[0].kept
    assert all(torch.equal(k, e) for k, e in zip(kept, expected, strict=True))
    assert model.config.vision_config._attn_implementation == backend  # restored on exit


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_fastervlm_generate_with_cache_equals_uncached(family):
    model, inputs = make(family, "sdpa")
    with pruneware.prune(model, "fastervlm@pre:0.3") as run:
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        kept_generate = run.report.stages[0].kept
        ids, uncached = uncached_greedy(model, inputs, 4)
    assert torch.equal(out.sequences, ids)
    torch.testing.assert_close(torch.stack(out.logits, 1), uncached, atol=1e-4, rtol=1e-4)
    with pruneware.prune(model, "fastervlm@pre:0.3") as run:
        with torch.no_grad():
            model(**inputs)
    assert all(torch.equal(a, b) for a, b in zip(kept_generate, run.report.stages[0].kept, strict=True))


def test_fastervlm_refuses_an_in_llm_stage_and_unsupported_towers():
    model, _ = make("llava", "sdpa")
    with pytest.raises(pruneware.PlanError, match="cannot run at 'pre'|runs only at 'pre'"):
        pruneware.prune(model, "fastervlm@2:0.5")
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(pruneware.PlanError, match="vision_feature_select_strategy='default'"):
        with pruneware.prune(model, "fastervlm@pre:0.5"):
            pass
    assert not model.model._forward_pre_hooks and not model.model.vision_tower._forward_hooks  # nothing left behind
