"""LLaVA-NeXT, Qwen2-VL, Qwen3-VL, and video for the Qwen families, through the core equivalence
suite (STYLE.md #6): keep-all is bit-identical, a pruned forward equals the plain-loop
reference, cached generation equals uncached recomputation, a padded batch (mixed resolutions,
images and videos) equals its samples alone; plus the layouts each adapter gives.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch

import pruneware
from pruneware.adapters import adapter_for
from tests.reference import pad_batch, record_lm_inputs, reference_logits, uncached_greedy
from tests.engine.test_equivalence import logits
from tests.tiny import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    llava_next_inputs,
    qwen_media_inputs,
    tiny_llava_next,
    tiny_qwen,
    tiny_qwen2_vl,
    tiny_qwen3_vl,
)

BUILDERS = {"llava_next": tiny_llava_next, "qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen, "qwen3_vl": tiny_qwen3_vl}
IMAGES = ["llava_next", "qwen2_vl", "qwen3_vl"]  # new image families
VIDEO = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
DEEPSTACK = 3  # tiny_qwen3_vl adds DeepStack features after layers 0, 1, 2


@cache
def model_for(family: str, attn: str = "sdpa"):
    return BUILDERS[family](attn)


def make(family: str, media: str = "image", attn: str = "sdpa"):
    """(model, one sample, samples of a padded batch) for a family and a kind of media."""
    model = model_for(family, attn)
    if family == "llava_next":  # (height, width) px: high-res grids 3x6, 6x1 (unpadded), 6x6, 6x3
        return model, llava_next_inputs(model, [(3, [(30, 80)], 5)]), [
            llava_next_inputs(model, [(2, [(84, 84)], 6)], seed=1), llava_next_inputs(model, [(5, [(84, 20)], 2)], seed=2),
            llava_next_inputs(model, [(3, [(30, 80), (80, 40)], 3)], seed=3),
        ]
    if media == "image":  # mixed resolutions: samples with 16, 24 and 8 + 16 visual tokens
        one, batch = [[3, ("image", 8, 12), 5]], [
            [[2, ("image", 8, 8), 6]], [[5, ("image", 8, 12), 2]], [[3, ("image", 4, 8), 3, ("image", 8, 8), 3]],
        ]
    else:  # video frames as units, alone and mixed with images in either order
        one, batch = [[2, ("image", 4, 8), 2, ("video", 3, 8, 8), 3]], [
            [[2, ("video", 2, 8, 8), 3]], [[3, ("image", 4, 8), 2, ("video", 3, 4, 8), 2]],
            [[4, ("video", 2, 4, 4), 1, ("image", 8, 8), 2]],
        ]
    return model, qwen_media_inputs(model, one), [qwen_media_inputs(model, s, seed=i + 1) for i, s in enumerate(batch)]


CASES = [(f, "image") for f in IMAGES] + [(f, "video") for f in VIDEO]


def kept_positions(model, inputs: dict, seen: dict, kept_visual: torch.Tensor) -> torch.Tensor:
    """Sample 0's text positions, LLaVA-NeXT newline rows (found independently, as the rows of the
    recorded embeddings equal to `image_newline`), and its kept visual positions, sorted."""
    ids = inputs["input_ids"][0]
    text = ~torch.isin(ids, torch.tensor([IMAGE_TOKEN, VIDEO_TOKEN]))
    if hasattr(model.model, "image_newline"):
        text |= (seen["embeds"][0] == model.model.image_newline).all(-1)
    return torch.cat([text.nonzero().squeeze(1), kept_visual]).sort().values


@pytest.mark.parametrize(("family", "media"), CASES)
@pytest.mark.parametrize("plan", ["random@pre:1.0", "random@1:1.0", "divprune@pre:1.0,fastv@3:1.0"])
def test_keep_all_is_bit_identical(family, media, plan):
    model, inputs, _ = make(family, media)
    expected = logits(model, inputs)
    with pruneware.prune(model, plan):
        got = logits(model, inputs)
    assert torch.equal(got, expected)


PLANS = ["divprune@pre:0.3", "random@2:0.4", "fastv@3:6", "divprune@pre:0.5,adaptinfer@1:0.3,random@4:0.15"]
# Qwen3-VL: stages before (1, 2), at (3) and after (4) the last DeepStack addition, and a `pre` stage.
DEEPSTACK_PLANS = ["random@1:0.5", "fastv@2:0.4", "fastv@3:0.4", "random@4:0.3", "divprune@pre:0.5,random@2:0.25"]


def _check_against_reference(model, inputs, plan):
    seen = record_lm_inputs(model, inputs)
    with pruneware.prune(model, plan, seed=3) as run:
        got = logits(model, inputs)
    stages = []
    for stage in run.report.stages:
        stages.append((0 if stage.where == "pre" else stage.where, kept_positions(model, inputs, seen, stage.kept[0])))
        assert stage.n_after[0] == len(stage.kept[0]) < stage.n_before[0]
    expected = reference_logits(model, seen, stages)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("family", "media"), CASES)
@pytest.mark.parametrize("plan", PLANS)
def test_pruned_forward_matches_reference(family, media, plan):
    model, inputs, _ = make(family, media)
    _check_against_reference(model, inputs, plan)


@pytest.mark.parametrize("media", ["image", "video"])
@pytest.mark.parametrize("plan", DEEPSTACK_PLANS)
def test_qwen3_deepstack_follows_the_kept_tokens(media, plan):
    model, inputs, _ = make("qwen3_vl", media)
    _check_against_reference(model, inputs, plan)


@pytest.mark.parametrize("family", ["llava_next", "qwen3_vl"])
def test_eager_attention_matches_reference(family):
    model, inputs, _ = make(family, "video" if family == "qwen3_vl" else "image", attn="eager")
    _check_against_reference(model, inputs, "divprune@pre:0.5,adaptinfer@2:0.25")


@pytest.mark.parametrize(
    ("family", "media", "plan"),
    [(f, m, "divprune@pre:0.4,random@3:0.5") for f, m in CASES]
    + [("qwen3_vl", m, "random@1:0.3") for m in ("image", "video")],  # inside the DeepStack layers
)
def test_cached_generate_equals_uncached_recomputation(family, media, plan):
    model, inputs, _ = make(family, media)
    with pruneware.prune(model, plan, seed=5):
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        ids, uncached = uncached_greedy(model, inputs, 4)
    assert torch.equal(out.sequences, ids)
    torch.testing.assert_close(torch.stack(out.logits, 1), uncached, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("family", "media"), CASES)
@pytest.mark.parametrize("plan", ["divprune@pre:0.3", "divprune@pre:0.5,adaptinfer@1:0.3,random@4:0.15"])
def test_padded_batch_equals_samples_alone(family, media, plan):
    model, _, samples = make(family, media)
    batch = pad_batch(samples)
    with pruneware.prune(model, plan, seed=2) as run:
        batched = logits(model, batch)
        batched_gen = model.generate(**batch, max_new_tokens=3, do_sample=False)
        batch_kept = [s.kept for s in run.report.stages]
        for b, sample in enumerate(samples):
            alone = logits(model, sample)
            offset = batch["input_ids"].shape[1] - sample["input_ids"].shape[1]
            for stage_kept, stage in zip(batch_kept, run.report.stages, strict=True):
                assert torch.equal(stage_kept[b] - offset, stage.kept[0])
            n = alone.shape[1]
            torch.testing.assert_close(batched[b, -n:], alone[0], atol=2e-5, rtol=1e-4)
            alone_gen = model.generate(**sample, max_new_tokens=3, do_sample=False)
            assert torch.equal(batched_gen[b, -3:], alone_gen[0, -3:])


# layouts ---------------------------------------------------------------------------------------


def test_llava_next_layout_has_base_and_high_res_units_and_keeps_newline_rows():
    model, _, samples = make("llava_next")
    inputs = samples[2]  # images of 30x80 px (high-res 3x6) and 80x40 px (6x3)
    adapter = adapter_for(model)
    layout = adapter.layout(inputs["input_ids"], inputs)
    assert layout.grids == [[(3, 3), (3, 6), (3, 3), (6, 3)]]
    counts = torch.bincount(layout.image_ids[0][layout.visual[0]]).tolist()
    assert counts == [9, 18, 9, 18]
    newline = (record_lm_inputs(model, inputs)["embeds"][0] == model.model.image_newline).all(-1)
    image_tokens = inputs["input_ids"][0] == IMAGE_TOKEN
    assert int(newline.sum()) == 3 + 6 and torch.equal(layout.visual[0], image_tokens & ~newline)
    # generate() drops image_sizes: the layout read from the packed features is the same
    features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True)
    from_features = adapter.layout(inputs["input_ids"], {"mm_encoder_outputs": {"image": features}})
    assert from_features.grids == layout.grids and torch.equal(from_features.image_ids, layout.image_ids)
    with pruneware.prune(model, "random@pre:4") as run:
        logits(model, inputs)
    kept = run.report.stages[0].kept[0]
    assert len(kept) == 4 and not bool(newline[kept].any())
    assert run.report.stages[0].n_before == [54]  # newline rows are not counted as visual tokens


def test_video_frames_are_units_in_order_of_appearance():
    model = model_for("qwen3_vl")
    inputs = qwen_media_inputs(model, [[2, ("video", 3, 4, 8), 2, ("image", 8, 8), 1, ("video", 2, 4, 4)]])
    layout = adapter_for(model).layout(inputs["input_ids"], inputs)
    assert layout.grids == [[(2, 4)] * 3 + [(4, 4)] + [(2, 2)] * 2]
    assert torch.bincount(layout.image_ids[0][layout.visual[0]]).tolist() == [8, 8, 8, 16, 4, 4]
    with pruneware.prune(model, "random@pre:12") as run:  # 48 tokens: 12 in proportion, >= 1 per unit
        logits(model, inputs)
    kept_units = layout.image_ids[0][run.report.stages[0].kept[0]]
    assert torch.bincount(kept_units, minlength=6).tolist() == [2, 2, 2, 4, 1, 1]


def test_crosslmm_pools_llava_next_units_on_their_grids():
    model, inputs, _ = make("llava_next")
    expected = logits(model, inputs)
    with pruneware.prune(model, "crosslmm[factor=1;gate=0.0]@pre:1.0"):
        assert torch.equal(logits(model, inputs), expected)
    with pruneware.prune(model, "crosslmm[factor=2]@pre:1.0") as run:
        logits(model, inputs)
    assert run.report.stages[0].n_after == [4 + 6]  # ceil(h/2) x ceil(w/2) bins: base 3x3, high-res 3x6


def test_crosslmm_pools_qwen2_vl_video_and_refuses_qwen3_vl():
    model, inputs, _ = make("qwen2_vl", "video")
    with pruneware.prune(model, "crosslmm@pre:0.5") as run:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
        ids, uncached = uncached_greedy(model, inputs, 3)
    assert run.report.stages[0].n_after[0] < run.report.stages[0].n_before[0]
    assert torch.equal(out.sequences, ids)
    torch.testing.assert_close(torch.stack(out.logits, 1), uncached, atol=1e-4, rtol=1e-4)
    model, _, _ = make("qwen3_vl", "image")
    with pytest.raises(pruneware.PlanError, match="cannot run merging policies"):
        pruneware.prune(model, "crosslmm@pre:0.5")


def test_generate_without_grids_reads_them_from_the_vision_tower():
    """generate() encodes pixels first and drops *_grid_thw; the layout must be the same."""
    model, inputs, _ = make("qwen2_5_vl", "video")
    reports = []
    with pruneware.prune(model, "random@pre:0.5", seed=1, on_report=reports.append) as run:
        logits(model, inputs)
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert len(reports) == 2 and run.report is reports[1]
    forward, generate = reports[0].stages[0], reports[1].stages[0]
    assert torch.equal(forward.kept[0], generate.kept[0]) and forward.n_before == generate.n_before


@pytest.mark.parametrize(("family", "media"), [("llava_next", "image"), ("qwen3_vl", "video")])
def test_sessions_leave_no_hooks_behind(family, media):
    model, inputs, _ = make(family, media)
    logits(model, inputs)  # transformers installs its own capture hooks on a first forward

    def hooks():
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())

    before = hooks()
    with pytest.raises(RuntimeError, match="boom"), pruneware.prune(model, "divprune@pre:0.5,fastv@1:0.3"):
        assert hooks() > before
        logits(model, inputs)
        raise RuntimeError("boom")
    assert hooks() == before
