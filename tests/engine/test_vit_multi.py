"""Several vision-side stages in one plan: `pre-vit`, then `vitK` in increasing K (then `pre` and
in-LLM stages), on Qwen2-VL, Qwen2.5-VL and LLaVA-1.5 (CLIP).

The same checks as tests/engine/test_vit_stages.py and test_vit_clip.py, for chains of cuts:
keep-all is bit-identical; for the kept sets the engine chose (one per stage, each inside the
one before), the logits equal a reference that runs the HF modules by hand (every unit until the
first cut, then from each cut's block on only that cut's units, the merger or projector on the
last cut's); a padded batch equals its samples alone; cached `generate` equals uncached
recomputation; the vision FLOPs a report gives equal torch's FlopCounterMode.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import pruneware
from tests.engine.test_vit_clip import CLIP_LAYERS
from tests.engine.test_vit_clip import _model as _clip_model
from tests.engine.test_vit_stages import DEPTH, _alone, _logits, _model, _sequences
from tests.reference import kept_positions, record_lm_inputs, reference_logits, uncached_greedy
from tests.tiny import IMAGE_TOKEN, VIDEO_TOKEN, llava_inputs, qwen_inputs, qwen_media_inputs

QWEN = ["qwen2-vl", "qwen2.5-vl"]


@pytest.fixture(scope="module", params=QWEN)
def model(request):
    return _model(request.param)


@pytest.fixture(scope="module")
def clip():
    return _clip_model()


def _blocks(report) -> list[int]:
    return [0 if s.where == "pre-vit" else int(s.where[3:]) for s in report.stages if isinstance(s.where, str)
            and (s.where == "pre-vit" or s.where.startswith("vit"))]


def _unit_flags(report, inputs, n_stages, visual_ids, unit_counts) -> list[list[torch.Tensor]]:
    """Per vision stage, per image (call order), [n_units] bool: the units it kept."""
    out = []
    for stage in report.stages[:n_stages]:
        flags_per_image, image = [], 0
        for b in range(inputs["input_ids"].shape[0]):
            visual = torch.isin(inputs["input_ids"][b], torch.tensor(visual_ids)).nonzero().squeeze(1)
            flags = torch.isin(visual, stage.kept[b])
            while flags.numel():
                n = unit_counts[image]
                flags_per_image.append(flags[:n])
                flags, image = flags[n:], image + 1
        out.append(flags_per_image)
    return out


# --- Qwen: the tower by hand, cut after cut ---------------------------------------------------
def reference_qwen_tower(model, pixels, grid, cuts: list[tuple[int, list[torch.Tensor]]]) -> list[torch.Tensor]:
    """Per image, [k, D] the merged tokens of the last cut's units. cuts: (block, per image keep flags)."""
    visual = model.model.visual
    full = set(getattr(visual, "fullatt_block_indexes", None) or range(DEPTH))
    windowed = hasattr(visual, "fullatt_block_indexes")
    out, start = [], 0
    for image, (t, h, w) in enumerate(grid):
        n = t * h * w
        x = visual.patch_embed(pixels[start : start + n])
        start += n
        hh, ww = h // 2, w // 2
        rows, cols = [], []
        for _ in range(t):
            for i in range(hh):
                for j in range(ww):
                    rows += [2 * i, 2 * i, 2 * i + 1, 2 * i + 1]
                    cols += [2 * j, 2 * j + 1, 2 * j, 2 * j + 1]
        cos, sin = visual.rotary_pos_emb(x, torch.tensor([rows, cols]).T)
        alive = torch.ones(t * hh * ww, dtype=torch.bool)
        for b, blk in enumerate(visual.blocks):
            for block, keeps in cuts:
                if block == b:
                    assert not (keeps[image] & ~alive).any()  # each cut keeps a subset of the one before
                    alive = keeps[image]
            for units in _sequences(visual, t, hh, ww, alive, windowed and b not in full):
                r = (units[:, None] * 4 + torch.arange(4)).reshape(-1)
                cu = torch.tensor([0, r.numel()], dtype=torch.int32)
                x[r] = blk(x[r], cu_seqlens=cu, position_embeddings=(cos[r], sin[r]))
        r = (alive.nonzero().squeeze(1)[:, None] * 4 + torch.arange(4)).reshape(-1)
        out.append(visual.merger(x[r]))
    return out


def _check_qwen(model, inputs, plan, pixels_key="pixel_values", grid_key="image_grid_thw"):
    out, report = _logits(model, inputs, plan)
    blocks = _blocks(report)
    grid = inputs[grid_key].tolist()
    visual_ids = [IMAGE_TOKEN, VIDEO_TOKEN]
    flags = _unit_flags(report, inputs, len(blocks), visual_ids, [t * h * w // 4 for t, h, w in grid])
    with torch.no_grad():
        tokens = reference_qwen_tower(model, inputs[pixels_key], grid, list(zip(blocks, flags, strict=True)))
        seen_all = record_lm_inputs(model, inputs)
    last, image = report.stages[len(blocks) - 1], 0
    for b in range(inputs["input_ids"].shape[0]):
        ids = inputs["input_ids"][b]
        visual = torch.isin(ids, torch.tensor(visual_ids)).nonzero().squeeze(1)
        embeds = seen_all["embeds"][b : b + 1].clone()
        taken = 0
        while taken < visual.numel():
            keep = flags[-1][image]
            embeds[0, visual[taken : taken + keep.numel()][keep]] = tokens[image].to(embeds.dtype)
            taken, image = taken + keep.numel(), image + 1
        real = inputs["attention_mask"][b].bool()
        seen = {"embeds": embeds[:, real], "positions": seen_all["positions"][..., b : b + 1, :][..., real]}
        kept = kept_positions(ids[real], visual_ids, last.kept[b] - int((~real).sum()))
        ref = reference_logits(model, seen, [(0, kept)])
        torch.testing.assert_close(out[b, -ref.shape[1]:], ref[0], atol=1e-5, rtol=1e-5)
    return report


@pytest.mark.parametrize("plan", ["random@pre-vit:1.0,random@vit1:1.0,random@vit3:1.0", "random@pre-vit:1.0,random@vit0:1.0"])
def test_keep_all_is_bit_identical(model, plan):
    inputs = qwen_inputs(model, [(3, [(8, 12), (12, 20)], 4), (5, [(4, 8)], 2)])
    ref, _ = _logits(model, inputs)
    out, report = _logits(model, inputs, plan)
    assert torch.equal(out, ref)
    assert len(report.stages) == plan.count("@") and all(s.n_after == s.n_before for s in report.stages)


@pytest.mark.parametrize("plan", [
    "pixelprune@pre-vit:0.8,divprune@vit1:0.5", "random@pre-vit:0.6,random@vit0:0.8,divprune@vit2:0.5",
    "random@vit1:0.7,random@vit3:5", "random@pre-vit:0.7,fastervlm@vit2:0.5",
])
def test_chained_cuts_equal_the_reference(model, plan):
    if "fastervlm" in plan and model.config.model_type == "qwen2_vl":
        plan = plan.replace("vit2", "vit3")  # the block read is the last full one before K: any on Qwen2-VL
    inputs = qwen_inputs(model, [(3, [(8, 12), (12, 20)], 4), (6, [(4, 8)], 2)])
    report = _check_qwen(model, inputs, plan)
    counts = [s.n_after for s in report.stages]
    assert all(later <= earlier for a, b in zip(counts, counts[1:]) for later, earlier in zip(b, a))
    assert counts[-1] < counts[0]
    for first, second in zip(report.stages, report.stages[1:]):
        for a, b in zip(first.kept, second.kept, strict=True):
            assert torch.isin(b, a).all()  # each stage chooses among the units the one before kept


def test_video(model):
    inputs = qwen_media_inputs(model, [[3, ("video", 2, 8, 12), 4]])
    report = _check_qwen(model, inputs, "random@pre-vit:0.75,random@vit2:0.5", "pixel_values_videos", "video_grid_thw")
    assert [s.n_after for s in report.stages] == [[36], [24]]


def test_padded_batch_equals_samples_alone(model):
    samples = [(3, [(8, 12)], 4), (7, [(12, 20), (4, 4)], 2)]
    plan = "pixelprune@pre-vit:0.8,divprune@vit1:0.5,random@1:0.5"
    out, _ = _logits(model, qwen_inputs(model, samples), plan)
    for b in range(len(samples)):
        alone, _ = _logits(model, _alone(model, samples, b), plan)
        torch.testing.assert_close(out[b, -1], alone[0, -1], atol=1e-5, rtol=1e-5)


def test_cached_generate_equals_uncached_recomputation(model):
    inputs = _alone(model, [(3, [(8, 12)], 4), (7, [(12, 20), (4, 4)], 2)], 1)
    with pruneware.prune(model, "random@pre-vit:0.8,divprune@vit2:0.5,random@1:0.5", seed=5) as run:
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        assert [s.n_after for s in run.report.stages[:2]] == [[51], [32]]
        ids, uncached = uncached_greedy(model, inputs, 4)
    assert torch.equal(out.sequences, ids)
    torch.testing.assert_close(torch.stack(out.logits, 1), uncached, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", QWEN)
def test_vision_flops_are_what_ran(family):
    model = _model(family, attn="eager")  # torch's counter skips the CPU sdpa kernel
    inputs = qwen_inputs(model, [(3, [(8, 12), (12, 20)], 4)])
    for plan in ["random@pre-vit:0.5,random@vit2:0.5", "random@vit1:0.6,random@vit3:0.3"]:
        with torch.no_grad(), pruneware.prune(model, plan) as run, FlopCounterMode(display=False) as counter:
            model(**inputs, use_cache=False)
        tower = next(v for k, v in counter.get_flop_counts().items() if k.endswith("model.visual"))
        assert sum(run.report.vision_flops) == pytest.approx(float(sum(tower.values())))


def test_pixelprune_after_a_cut_is_refused(model):
    inputs = qwen_inputs(model, [(3, [(8, 12)], 4)])
    with pytest.raises(pruneware.PlanError, match="make pixelprune the plan's first vision-side stage"):
        _logits(model, inputs, "random@pre-vit:0.5,pixelprune@vit1:1.0")
    # the forward failed inside the tower: the session still leaves nothing in this context
    import contextvars

    slots = [v for var, v in contextvars.copy_context().items() if var.name == "pruneware_requests"]
    assert all(not s for s in slots), slots


# --- LLaVA (CLIP) ------------------------------------------------------------------------------
def reference_clip(model, pixels, cuts: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """[n, k, D] projected features of the last cut's patches; cuts: (layer, [n, 16] keep flags)."""
    tower = model.model.vision_tower
    x = tower.pre_layrnorm(tower.embeddings(pixels))  # [n, 17, d]
    n = x.shape[0]
    rows = torch.arange(x.shape[1]).expand(n, -1)  # the original rows x holds
    feature = feature_rows = None
    for i, layer in enumerate(tower.encoder.layers):
        for block, keep in cuts:
            if block == i:
                new = torch.cat([torch.zeros(n, 1, dtype=torch.long), keep.nonzero()[:, 1].view(n, -1) + 1], 1)
                x = torch.stack([x[b, torch.searchsorted(rows[b], new[b])] for b in range(n)])
                rows = new
        x = layer(x, None)
        if i == CLIP_LAYERS - 2:  # hidden_states[-2]
            feature, feature_rows = x, rows
    final = rows
    feature = torch.stack([feature[b, torch.searchsorted(feature_rows[b], final[b])] for b in range(n)])
    return model.model.multi_modal_projector(feature[:, 1:])


def _check_clip(model, inputs, plan):
    out, report = _logits(model, inputs, plan)
    blocks = _blocks(report)
    n_images = inputs["pixel_values"].shape[0]
    flags = _unit_flags(report, inputs, len(blocks), [IMAGE_TOKEN], [16] * n_images)
    with torch.no_grad():
        feats = reference_clip(model, inputs["pixel_values"], [(b, torch.stack(f)) for b, f in zip(blocks, flags)])
        seen_all = record_lm_inputs(model, inputs)
    ids, last, image = inputs["input_ids"], report.stages[len(blocks) - 1], 0
    for b in range(ids.shape[0]):
        embeds = seen_all["embeds"][b : b + 1].clone()
        for slots in (ids[b] == IMAGE_TOKEN).nonzero().squeeze(1).view(-1, 16):
            embeds[0, slots[flags[-1][image]]] = feats[image].to(embeds.dtype)
            image += 1
        real = inputs["attention_mask"][b].bool()
        kept = kept_positions(ids[b, real], [IMAGE_TOKEN], last.kept[b] - int((~real).sum()))
        ref = reference_logits(model, {"embeds": embeds[:, real], "positions": None}, [(0, kept)])
        torch.testing.assert_close(out[b, -ref.shape[1]:], ref[0], atol=1e-5, rtol=1e-5)
    return report


def test_clip_keep_all_is_bit_identical(clip):
    inputs = llava_inputs(clip, [(3, 2, 4)])
    ref, _ = _logits(clip, inputs)
    out, _ = _logits(clip, inputs, "random@pre-vit:1.0,random@vit1:1.0,random@vit3:1.0")
    assert torch.equal(out, ref)


@pytest.mark.parametrize("plan", [
    "random@pre-vit:0.75,divprune@vit1:0.5",  # both cuts before the feature layer (2)
    "random@vit1:0.75,fastervlm@vit3:0.5",  # the feature layer between the cuts; [CLS] attention over the kept rows
    "random@pre-vit:0.75,random@vit0:0.5,random@vit3:3",
])
def test_clip_chained_cuts_equal_the_reference(clip, plan):
    report = _check_clip(clip, llava_inputs(clip, [(3, 2, 4), (6, 1, 2)]), plan)
    assert report.stages[1].n_after[0] < report.stages[0].n_after[0]


def test_clip_padded_batch_equals_samples_alone(clip):
    plan = "random@pre-vit:0.75,divprune@vit2:0.5,random@1:0.5"
    batch = llava_inputs(clip, [(3, 1, 4), (6, 1, 2)])
    out, _ = _logits(clip, batch, plan)
    for b in range(2):
        ids = batch["input_ids"][b, batch["attention_mask"][b].bool()][None]
        alone = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": batch["pixel_values"][b : b + 1]}
        torch.testing.assert_close(out[b, -1], _logits(clip, alone, plan)[0][0, -1], atol=1e-5, rtol=1e-5)


def test_clip_vision_flops_are_what_ran():
    clip = _clip_model(attn="eager")
    inputs = llava_inputs(clip, [(3, 2, 4)])
    for plan in ["random@pre-vit:0.75,random@vit2:0.5", "random@vit1:0.5,random@vit3:0.25"]:
        with torch.no_grad(), pruneware.prune(clip, plan) as run, FlopCounterMode(display=False) as counter:
            clip(**inputs, use_cache=False)
        counts = counter.get_flop_counts()
        vision = sum(sum(v.values()) for k, v in counts.items()
                     if k.endswith(("model.vision_tower", "model.multi_modal_projector")))
        assert sum(run.report.vision_flops) == pytest.approx(float(vision))
