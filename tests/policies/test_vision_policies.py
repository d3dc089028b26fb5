"""Pre-LLM policies that read the vision tower pick what a hand computation on the tower's own
eager attention weights picks: padded batches, several images, generate with a cache."""

from __future__ import annotations

import importlib

import pytest
import torch
from transformers.vision_utils import get_vision_window_index

import pruneware
from pruneware.policies import split_budget
from tests.reference import record_lm_inputs, uncached_greedy
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


def record_eager_weights(model, monkeypatch, family: str) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.nn.Module]:
    """Patch the vision tower's eager attention to keep the probabilities transformers' own
    eager function returns, and the keys it is given, at the layer the policies read."""
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

    def recording(mod, query, key, *args, **kwargs):
        out, weights = original(mod, query, key, *args, **kwargs)
        if mod is target:
            seen.append((weights.detach(), key.detach()))
        return out, weights

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    return seen, target


def image_scores_by_hand(model, inputs, monkeypatch, family: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per image (in batch order), the score [n] and head-averaged key [n, d] of each of its visual tokens."""
    model.set_attn_implementation({"vision_config": "eager"})
    seen, _ = record_eager_weights(model, monkeypatch, family)
    with torch.no_grad():
        if family == "llava":
            model.model.vision_tower(inputs["pixel_values"])
            ((weights, keys),) = seen  # [n_images, H, 1 + n, 1 + n], [n_images, H, 1 + n, d]
            return list(weights[:, :, 0, 1:].mean(dim=1)), list(keys[:, :, 1:].mean(dim=1))  # [CLS] row
        visual = model.model.visual
        grid = inputs["image_grid_thw"]
        visual(inputs["pixel_values"], grid_thw=grid)
    # One chunk per image: [1, H, n, n]; mean over heads and query rows = attention received.
    received = torch.cat([w[0].mean(dim=0).mean(dim=0) for w, _ in seen])  # patches, in window order
    keys = torch.cat([k[0].mean(dim=0) for _, k in seen])  # [patches, d]
    unit = visual.spatial_merge_size**2
    groups, group_keys = received.view(-1, unit).mean(dim=1), keys.view(-1, unit, keys.shape[-1]).mean(dim=1)
    window = get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size, visual.patch_size)[0]
    ordered, ordered_keys = torch.empty_like(groups), torch.empty_like(group_keys)
    ordered[window], ordered_keys[window] = groups, group_keys
    sizes = (grid.prod(-1) // unit).tolist()
    return list(ordered.split(sizes)), list(ordered_keys.split(sizes))


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
    expected = top_by_hand(inputs, image_scores_by_hand(model, inputs, monkeypatch, family)[0], 7)
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
        pruneware.prune(model, "fastervlm@pre:0.5")
    assert not model.model._forward_pre_hooks and not model.model.vision_tower._forward_hooks  # nothing left behind


def visionzip_by_hand(hidden, scores, keys, dominant_num: int, contextual_num: int):
    """The official VisionZip merge for one image, written as its code does it (masks, one-hot,
    bmm): hidden [n, D], scores [n], keys [n, d] -> (kept slots, their states in slot order)."""
    n = hidden.shape[0]
    mask = torch.ones(n, dtype=torch.bool).scatter_(0, scores.topk(dominant_num).indices, False)
    slots, states = [(~mask).nonzero().squeeze(1)], [hidden[~mask]]
    if contextual_num:
        metric = keys[mask] / keys[mask].norm(dim=-1, keepdim=True)
        filtered = hidden[mask]
        step = max(1, metric.shape[0] // contextual_num)
        target_indices = torch.arange(0, metric.shape[0], step)[:contextual_num]
        to_merge = ~torch.isin(torch.arange(metric.shape[0]), target_indices)
        similarity = metric[to_merge] @ metric[target_indices].T
        one_hot = torch.zeros(int(to_merge.sum()), contextual_num).scatter_(1, similarity.argmax(dim=1)[:, None], 1)
        counts = one_hot.sum(dim=0).clamp(min=1)[:, None]
        slots.append(mask.nonzero().squeeze(1)[target_indices])
        states.append(filtered[target_indices] + one_hot.T @ filtered[to_merge] / counts)
    slots, order = torch.cat(slots).sort()
    return slots, torch.cat(states)[order]


@pytest.mark.parametrize("family,feature_layer", [("llava", -1), ("llava", -2), ("qwen", -1)])
@pytest.mark.parametrize("backend,dominant", [("eager", None), ("sdpa", None), ("sdpa", 0.5)])
def test_visionzip_matches_hand_computation(family, feature_layer, backend, dominant, monkeypatch):
    model, inputs = make(family, "eager", feature_layer)
    scores, keys = image_scores_by_hand(model, inputs, monkeypatch, family)
    monkeypatch.undo()
    model.set_attn_implementation(backend)
    embeds = record_lm_inputs(model, inputs)["embeds"]  # [B, L, D] the unpruned LLM input
    budget, share = 12, 54 / 64 if dominant is None else dominant
    expected_kept, expected_states, image = [], [], 0
    for b, ids in enumerate(inputs["input_ids"]):
        positions = (ids == IMAGE_TOKEN).nonzero().squeeze(1)
        sizes = []
        while sum(sizes) < len(positions):
            sizes.append(len(scores[image + len(sizes)]))
        kept, states, start = [], [], 0
        for size, k in zip(sizes, split_budget(sizes, budget), strict=True):
            rows = positions[start : start + size]
            n_dominant = max(1, min(k, round(k * share)))
            slots, merged = visionzip_by_hand(embeds[b, rows], scores[image], keys[image], n_dominant, k - n_dominant)
            kept.append(rows[slots])
            states.append(merged)
            start += size
            image += 1
        expected_kept.append(torch.cat(kept))
        expected_states.append(torch.cat(states))
    seen = {}

    def record(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"])

    plan = "visionzip@pre:12" if dominant is None else f"visionzip[dominant={dominant}]@pre:12"
    with pruneware.prune(model, plan) as run, torch.no_grad():
        handle = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
        try:
            model(**inputs)
        finally:
            handle.remove()
    for b, kept in enumerate(run.report.stages[0].kept):
        assert torch.equal(kept, expected_kept[b])
        ids = inputs["input_ids"][b]
        rows = torch.cat([(ids != IMAGE_TOKEN).nonzero().squeeze(1), kept]).sort().values  # the pruned row, left-padded
        got = seen["embeds"][b, -len(rows) :][torch.isin(rows, kept)]
        torch.testing.assert_close(got, expected_states[b], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_visionzip_generate_with_cache_equals_uncached(family):
    model, inputs = make(family, "sdpa")
    with pruneware.prune(model, "visionzip@pre:0.5"):
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        ids, uncached = uncached_greedy(model, inputs, 4)
    assert torch.equal(out.sequences, ids)
    torch.testing.assert_close(torch.stack(out.logits, 1), uncached, atol=1e-4, rtol=1e-4)


def test_visionzip_bad_parameter_names_the_range():
    with pytest.raises(pruneware.PlanError, match=r"dominant must be a share of the budget in \(0, 1\]"):
        pruneware.prune(tiny_llava(), "visionzip[dominant=2]@pre:0.5")


def test_visionzip_split_follows_the_official_defaults():
    from pruneware.policies.visionzip import VisionZipPolicy

    share = VisionZipPolicy().dominant
    assert [(round(k * share), k - round(k * share)) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]


def test_vision_side_policies_name_the_supported_models():
    from tests.tiny import tiny_llava_next

    with pytest.raises(pruneware.PlanError, match="support LLaVA-1.5, Qwen2-VL and Qwen2.5-VL"):
        pruneware.prune(tiny_llava_next("sdpa"), "fastervlm@pre:0.5")


def test_flash_packed_call_scores_each_image_alone():
    """Under flash attention the Qwen ViT packs every image into one call with cu_seq_lens_q."""
    model = tiny_qwen("sdpa")
    adapter = pruneware.adapters.adapter_for(model)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 2, 40, 16, generator=g)
    bounds = torch.tensor([0, 16, 40], dtype=torch.int32)
    packed, packed_keys = adapter.vision_call_scores(q, k, 0.25, {"cu_seq_lens_q": bounds})
    alone = [adapter.vision_call_scores(q[:, :, a:b], k[:, :, a:b], 0.25, {}) for a, b in ((0, 16), (16, 40))]
    torch.testing.assert_close(packed, torch.cat([s for s, _ in alone]))
    torch.testing.assert_close(packed_keys, torch.cat([kk for _, kk in alone]))
    by_hand = torch.softmax(q[0, :, :16] @ k[0, :, :16].transpose(1, 2) * 0.25, dim=-1).mean(dim=(0, 1))
    torch.testing.assert_close(packed[:16], by_hand)


@pytest.mark.parametrize("policy", ["fastervlm", "visionzip", "resize"])
def test_the_vllm_plugin_refuses_vision_side_policies(policy):
    from pruneware.integrations.vllm.spec import check_stage
    from pruneware.plans.plan import Stage

    with pytest.raises(pruneware.PlanError, match="does not hook; pre-LLM policies: crosslmm, divprune, random, vision-score"):
        check_stage(Stage(policy, "pre", 0.5))


@pytest.mark.parametrize("family", ["llava", "qwen"])
@pytest.mark.parametrize("plan", ["fastervlm@pre:0.5", "visionzip@pre:0.5", "resize@pre:0.5"])
def test_vision_side_sessions_restore_the_model_exactly(family, plan):
    from tests.engine.test_lifecycle import fingerprint

    model, inputs = make(family, "sdpa")
    expected = model(**inputs).logits  # the first forward installs transformers' own capture hooks
    before = fingerprint(model)
    with pytest.raises(KeyError, match="boom"):
        with pruneware.prune(model, plan):
            model(**inputs)
            raise KeyError("boom")
    assert fingerprint(model) == before
    assert torch.equal(model(**inputs).logits, expected)
