"""Vision-side stages (`vitK`, `pre-vit`) on Qwen2-VL and Qwen2.5-VL.

Keep-all is bit-identical to the unpruned model at every K; for a kept set (the one the engine
chose), the logits equal an independent reference that runs the HF tower's own modules by hand:
every block on each attention sequence it should see (each frame, or each window of 2x2 units
laid out here from the config, ragged after the cut), only the kept units from block K on, then
the merger on the kept units, the language model on the kept positions (`tests/reference.py`).
The vision FLOPs a report gives equal torch's FlopCounterMode on the cut tower.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

import pruneware
from pruneware.models.tiny_configs import tiny_config
from tests.reference import kept_positions, record_lm_inputs, reference_logits
from tests.tiny import _QWEN_IDS, IMAGE_TOKEN, PAD, VIDEO_TOKEN, qwen_inputs, qwen_media_inputs

DEPTH = 4


def _model(family: str, attn: str = "sdpa"):
    """A tiny model whose tower has 4 blocks; Qwen2.5-VL's 1 and 3 attend over whole frames, 0 and 2
    within windows of 2x2 units (56 px)."""
    torch.manual_seed(0)
    vision = {"depth": DEPTH}
    if family == "qwen2.5-vl":
        vision["fullatt_block_indexes"] = [1, 3]
    config = tiny_config(family, layers=2, text={"pad_token_id": PAD}, vision=vision, **_QWEN_IDS)
    config._attn_implementation = attn
    cls = Qwen2_5_VLForConditionalGeneration if family == "qwen2.5-vl" else Qwen2VLForConditionalGeneration
    model = cls(config).eval()
    model.generation_config.pad_token_id = PAD
    return model


FAMILIES = ["qwen2-vl", "qwen2.5-vl"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return _model(request.param)


def _logits(model, inputs, plan=None, **kw):
    with torch.no_grad():
        if plan is None:
            return model(**inputs, use_cache=False).logits, None
        with pruneware.prune(model, plan, **kw) as run:
            out = model(**inputs, use_cache=False).logits
        return out, run.report


# --- the independent reference -------------------------------------------------------------
def _sequences(visual, t: int, hh: int, ww: int, alive: torch.Tensor, windowed: bool) -> list[torch.Tensor]:
    """Row-major unit indices of each attention sequence of one image: per frame, or per window."""
    out = []
    for f in range(t):
        grid = torch.arange(f * hh * ww, (f + 1) * hh * ww).view(hh, ww)
        if not windowed:
            cells = [grid]
        else:
            size = visual.window_size // visual.spatial_merge_size // visual.patch_size
            cells = [grid[i : i + size, j : j + size] for i in range(0, hh, size) for j in range(0, ww, size)]
        for cell in cells:
            units = cell.reshape(-1)
            units = units[alive[units]]
            if units.numel():
                out.append(units)
    return out


def reference_tower(model, pixels: torch.Tensor, grid: list[list[int]], block: int, keep: list[torch.Tensor]):
    """Per image, [k, D] the merged tokens of its kept units (row-major), the tower run by hand."""
    visual = model.model.visual
    full = set(getattr(visual, "fullatt_block_indexes", None) or range(DEPTH))
    windowed_model = hasattr(visual, "fullatt_block_indexes")
    out, start = [], 0
    for (t, h, w), kept in zip(grid, keep, strict=True):
        n = t * h * w
        x = visual.patch_embed(pixels[start : start + n])  # [n, d], unit after unit, row-major
        start += n
        hh, ww = h // 2, w // 2
        rows, cols = [], []
        for _ in range(t):
            for i in range(hh):
                for j in range(ww):
                    rows += [2 * i, 2 * i, 2 * i + 1, 2 * i + 1]
                    cols += [2 * j, 2 * j + 1, 2 * j, 2 * j + 1]
        cos, sin = visual.rotary_pos_emb(x, torch.tensor([rows, cols]).T)
        for b, blk in enumerate(visual.blocks):
            alive = torch.ones(t * hh * ww, dtype=torch.bool) if b < block else kept
            for units in _sequences(visual, t, hh, ww, alive, windowed_model and b not in full):
                r = (units[:, None] * 4 + torch.arange(4)).reshape(-1)
                cu = torch.tensor([0, r.numel()], dtype=torch.int32)
                x[r] = blk(x[r], cu_seqlens=cu, position_embeddings=(cos[r], sin[r]))
        r = (kept.nonzero().squeeze(1)[:, None] * 4 + torch.arange(4)).reshape(-1)
        out.append(visual.merger(x[r]))
    return out


def _reference_check(model, inputs, plan, pixels_key="pixel_values", grid_key="image_grid_thw"):
    """Run `plan`, then compare every sample with the reference on the kept set it chose."""
    out, report = _logits(model, inputs, plan)
    stage = report.stages[0]
    block = int(stage.where[3:]) if stage.where != "pre-vit" else 0
    grid = inputs[grid_key].tolist()
    visual_ids = [IMAGE_TOKEN, VIDEO_TOKEN]
    # per image: kept units, from the kept input positions the report gives
    keep, image = [], 0
    for b in range(inputs["input_ids"].shape[0]):
        visual = torch.isin(inputs["input_ids"][b], torch.tensor(visual_ids)).nonzero().squeeze(1)
        flags = torch.isin(visual, stage.kept[b])
        while flags.numel():
            t, h, w = grid[image]
            n = t * h * w // 4
            keep.append(flags[:n])
            flags, image = flags[n:], image + 1
    with torch.no_grad():
        tokens = reference_tower(model, inputs[pixels_key], grid, block, keep)
        seen_all = record_lm_inputs(model, inputs)
    image = 0
    for b in range(inputs["input_ids"].shape[0]):
        ids = inputs["input_ids"][b]
        visual = torch.isin(ids, torch.tensor(visual_ids)).nonzero().squeeze(1)
        embeds = seen_all["embeds"][b : b + 1].clone()
        taken = 0
        while taken < visual.numel():
            n = keep[image].numel()
            slots = visual[taken : taken + n][keep[image]]
            embeds[0, slots] = tokens[image].to(embeds.dtype)
            taken, image = taken + n, image + 1
        real = inputs["attention_mask"][b].bool()
        seen = {"embeds": embeds[:, real], "positions": seen_all["positions"][..., b : b + 1, :][..., real]}
        kept = kept_positions(ids[real], visual_ids, stage.kept[b] - int((~real).sum()))
        ref = reference_logits(model, seen, [(0, kept)])
        ours = out[b, -ref.shape[1]:]
        torch.testing.assert_close(ours, ref[0], atol=1e-5, rtol=1e-5)
    return report


# --- tests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["pre-vit", "vit0", "vit1", "vit3"])
def test_keep_all_is_bit_identical(model, where):
    inputs = qwen_inputs(model, [(3, [(8, 12), (12, 20)], 4), (5, [(4, 8)], 2)])
    ref, _ = _logits(model, inputs)
    out, report = _logits(model, inputs, f"random@{where}:1.0")
    assert torch.equal(out, ref)
    assert report.stages[0].n_after == report.stages[0].n_before


@pytest.mark.parametrize("plan", ["random@vit1:0.5", "divprune@vit2:0.4", "random@vit3:7", "random@pre-vit:0.3"])
def test_pruned_tower_equals_the_reference_single_image(model, plan):
    inputs = qwen_inputs(model, [(3, [(12, 20)], 4)])
    report = _reference_check(model, inputs, plan)
    assert report.stages[0].n_after[0] < report.stages[0].n_before[0]


def test_two_images_of_different_sizes_in_a_padded_batch(model):
    inputs = qwen_inputs(model, [(3, [(8, 12), (12, 20)], 4), (6, [(4, 8)], 2)])
    _reference_check(model, inputs, "random@vit2:0.5")


def test_video(model):
    inputs = qwen_media_inputs(model, [[3, ("video", 2, 8, 12), 4]])
    report = _reference_check(model, inputs, "random@vit1:0.5", "pixel_values_videos", "video_grid_thw")
    assert report.stages[0].n_after == [24]  # half of 2 frames x 24 units, split evenly


def test_attention_scored_policy_reads_a_full_block():
    model = _model("qwen2.5-vl")
    inputs = qwen_inputs(model, [(3, [(12, 20)], 4)])
    _reference_check(model, inputs, "fastervlm@vit2:0.5")  # mean attention received at block 1
    with pytest.raises(pruneware.PlanError, match=r"full-attention vision block before block 1.*\[1, 3\]"):
        pruneware.prune(model, "fastervlm@vit1:0.5").__enter__()


def test_padded_batch_equals_samples_alone(model):
    samples = [(3, [(8, 12)], 4), (7, [(12, 20), (4, 4)], 2)]
    batch = qwen_inputs(model, samples)
    out, _ = _logits(model, batch, "divprune@vit1:0.5,random@1:0.5")
    for b in range(len(samples)):
        alone, _ = _logits(model, _alone(model, samples, b), "divprune@vit1:0.5,random@1:0.5")
        torch.testing.assert_close(out[b, -1], alone[0, -1], atol=1e-5, rtol=1e-5)


def _alone(model, samples, b):
    """Sample b of `qwen_inputs(model, samples)` on its own, with the same tokens and pixels."""
    full = qwen_inputs(model, samples)
    real = full["attention_mask"][b].bool()
    first = sum(len(s[1]) for s in samples[:b])
    grids = full["image_grid_thw"][first : first + len(samples[b][1])]
    start = int(full["image_grid_thw"][:first].prod(-1).sum())
    pixels = full["pixel_values"][start : start + int(grids.prod(-1).sum())]
    ids = full["input_ids"][b, real][None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": (ids == IMAGE_TOKEN).int(),
            "pixel_values": pixels, "image_grid_thw": grids}


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_flops_are_what_ran(family):
    model = _model(family, attn="eager")  # torch's counter skips the CPU sdpa kernel
    inputs = qwen_inputs(model, [(3, [(8, 12), (12, 20)], 4)])
    for plan in ["random@vit2:1.0", "random@vit2:0.3", "random@pre-vit:0.5"]:
        with torch.no_grad(), pruneware.prune(model, plan) as run, FlopCounterMode(display=False) as counter:
            model(**inputs, use_cache=False)
        counts = counter.get_flop_counts()
        tower = next(v for k, v in counts.items() if k.endswith("model.visual"))
        assert sum(run.report.vision_flops) == pytest.approx(float(sum(tower.values())))
    unpruned = pruneware.adapters.adapter_for(model).input_vision_flops(inputs)
    with torch.no_grad(), pruneware.prune(model, "random@vit2:1.0") as run:
        model(**inputs, use_cache=False)
    assert run.report.vision_flops == pytest.approx(unpruned)


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_flops_of_alike_images_are_what_ran(family):
    """Alike images keep k units each: the cut knows each frame's count on the host and reuses its
    window counts; the FLOPs still equal what ran."""
    model = _model(family, attn="eager")  # torch's counter skips the CPU sdpa kernel
    inputs = qwen_inputs(model, [(3, [(8, 12)], 4), (2, [(8, 12)], 3)])
    for plan in ["random@vit2:0.3", "random@pre-vit:0.5", "random@pre-vit:0.8,random@vit2:0.5"]:
        with torch.no_grad(), pruneware.prune(model, plan) as run, FlopCounterMode(display=False) as counter:
            model(**inputs, use_cache=False)
        tower = next(v for k, v in counter.get_flop_counts().items() if k.endswith("model.visual"))
        assert sum(run.report.vision_flops) == pytest.approx(float(sum(tower.values())))


@pytest.mark.parametrize(("plan", "match"), [
    ("random@vit4:0.5", r"vision tower has 4 blocks: use vit0\.\.vit3"),
    ("fastv@vit1:0.5", r"cannot run in the vision tower; policies that can: .*divprune"),
    ("resize@vit1:0.5", r"cannot run in the vision tower"),
    ("random@vit1:0.5,random@pre-vit:0.5", "'pre-vit' first, then 'vitK' in increasing K"),
    ("random@vit1:0", "at least one unit per image"),
])
def test_bad_plans_are_refused_before_any_hook(model, plan, match):
    with pytest.raises(pruneware.PlanError, match=match):
        pruneware.prune(model, plan).__enter__()
    assert not model.model.visual.blocks[1]._forward_pre_hooks
    assert not model.model.visual._forward_hooks


def test_towers_without_a_cut_are_refused():
    from tests.tiny import tiny_llava_next

    model = tiny_llava_next()
    model.config.vision_feature_select_strategy = "full"  # no [CLS] outside the visual tokens
    with pytest.raises(pruneware.PlanError, match="vision_feature_select_strategy='default'"):
        pruneware.prune(model, "random@vit1:0.5").__enter__()
    assert not model.model.vision_tower._forward_pre_hooks


@pytest.mark.parametrize("plan", ["random@vit2:0.5", "divprune@vit1:0.5,random@1:0.5"])
def test_cached_generate_equals_uncached_recomputation(model, plan):
    from tests.reference import uncached_greedy

    inputs = _alone(model, [(3, [(8, 12)], 4), (7, [(12, 20), (4, 4)], 2)], 1)
    with pruneware.prune(model, plan, seed=5) as run:
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        assert run.report.stages[0].n_after == [32]  # half of each image (60 and 4 units), decided in the tower
        ids, uncached = uncached_greedy(model, inputs, 4)
    assert torch.equal(out.sequences, ids)
    torch.testing.assert_close(torch.stack(out.logits, 1), uncached, atol=1e-4, rtol=1e-4)


def test_avg_tokens_does_not_place_vision_stages(model):
    with pytest.raises(pruneware.PlanError, match="does not place vision-side stages"):
        pruneware.prune(model, "random@vit1,random@1", avg_tokens=16).__enter__()


def test_text_only_prompts_pass_and_every_hook_goes_with_the_session(model):
    inputs = qwen_inputs(model, [(6, [], 4)])
    ref, _ = _logits(model, inputs)
    out, report = _logits(model, inputs, "fastervlm@vit2:0.5" if model.config.model_type == "qwen2_vl" else "random@vit2:0.5")
    assert torch.equal(out, ref) and report.stages[0].n_after == [0]
    hooked = [name for name, m in model.named_modules()
              if m._forward_hooks or m._forward_pre_hooks or getattr(m, "_forward_hooks_with_kwargs", None)]
    assert not hooked


def test_sessions_leave_nothing_in_the_context(model):
    """A `with prune(...)` per request must not grow the thread's context (see tests/engine/test_soak.py),
    nor leave entries in the engine's shared context-local slots."""
    import contextvars

    inputs = _alone(model, [(3, [(8, 12)], 4)], 0)
    with pruneware.prune(model, "random@vit1:0.5"):
        _logits(model, inputs)
    before = len(contextvars.copy_context())
    for plan in ["random@vit1:0.5", "divprune@vit2:0.5,random@1:0.5", "random@pre-vit:0.5"]:
        with pruneware.prune(model, plan):
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
            _logits(model, inputs)
    context = contextvars.copy_context()
    assert len(context) == before
    slots = [value for var, value in context.items() if var.name == "pruneware_requests"]
    assert all(not s for s in slots)


@pytest.mark.parametrize("plan", ["random@vit1:0.5", "divprune@pre:0.5"])
def test_a_tower_call_alone_leaves_nothing_in_the_context(model, plan):
    """The vision tower run outside a forward (`get_image_features`, as vLLM-side tests and feature
    extraction call it): what the session saw of it goes when the session closes."""
    import contextvars

    inputs = _alone(model, [(3, [(8, 12)], 4)], 0)
    with pruneware.prune(model, plan), torch.inference_mode():
        model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    slots = [value for var, value in contextvars.copy_context().items() if var.name == "pruneware_requests"]
    assert all(not s for s in slots), slots
