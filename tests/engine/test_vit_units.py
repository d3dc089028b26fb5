"""The launch-lean paths of the vision-side stages (`pruneware/engine/vit_units.py`, `ClipVisionCut.cut_rows`)
give what the general paths give: the policy's batch, the cut, and the kept slots at the language model."""

from __future__ import annotations

import pytest
import torch

from pruneware.adapters.registry import adapter_for
from pruneware.engine.vit_units import ShapeCache, picked_rows, uniform_language_keep, unit_input
from pruneware.plans.plan import Plan
from tests.tiny import tiny_llava


def _stage(plan: str = "random@vit1:0.5"):
    return Plan.parse(plan).vision[0]


@pytest.mark.parametrize("units", [[(1, 4, 4)], [(1, 4, 4)] * 3, [(2, 2, 3)] * 2])
@pytest.mark.parametrize("with_scores", [False, True])
def test_uniform_batch_equals_the_general_one(units, with_scores):
    n_units = sum(t * h * w for t, h, w in units)
    g = torch.Generator().manual_seed(0)
    feats, scores = torch.randn(n_units, 5, generator=g), torch.randn(n_units, generator=g)
    scores = scores if with_scores else None
    stage = _stage()
    fast, fast_counts = unit_input(stage, feats, scores, units, 7, None, ShapeCache())
    # every unit alive: the general path (the one a later stage takes), with its host read
    slow, slow_counts = unit_input(stage, feats, scores, units, 7, torch.ones(n_units, dtype=torch.bool))
    assert fast_counts == slow_counts
    for name in ("hidden", "valid", "image_ids", "vision_scores"):
        a, b = getattr(fast, name), getattr(slow, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert fast.sizes == slow.sizes and fast.grids == slow.grids and fast.seed == slow.seed


def test_the_shape_cache_builds_once_per_shape():
    cache, built = ShapeCache(), []

    def build():
        built.append(1)
        return torch.zeros(2)

    a = cache.get(("x", 2), torch.device("cpu"), build)
    assert cache.get(("x", 2), torch.device("cpu"), build) is a and len(built) == 1
    cache.get(("x", 3), torch.device("cpu"), build)
    assert len(built) == 2


def test_picked_rows_stacks_equal_counts_only():
    a, b = torch.tensor([0, 2]), torch.tensor([1, 3])
    assert torch.equal(picked_rows([a, b], torch.device("cpu")), torch.stack([a, b]))
    assert picked_rows([a, torch.tensor([1])], torch.device("cpu")) is None
    assert picked_rows([], torch.device("cpu")) is None


@pytest.mark.parametrize(("batch", "images"), [(1, 1), (2, 1), (2, 2), (3, 2)])
def test_language_keep_equals_the_masks(batch, images):
    """Per sample, the kept indices into its visual slots: from [n_images, k] rows and host counts,
    as from the row-major keep mask laid over the slots (what the general path reads)."""
    size, k = 16, 5
    g = torch.Generator().manual_seed(batch * 10 + images)
    rows = torch.stack([torch.randperm(size, generator=g)[:k].sort().values for _ in range(batch * images)])
    calls = [rows[: batch * images // 2], rows[batch * images // 2 :]] if batch * images > 1 else [rows]
    kept = uniform_language_keep(calls, [(1, 4, 4)] * (batch * images), [images * size] * batch, ShapeCache())
    mask = torch.zeros(batch * images, size, dtype=torch.bool).scatter_(1, rows, True).view(batch, -1)
    for b in range(batch):
        assert torch.equal(kept[b], mask[b].nonzero().squeeze(1))


def test_language_keep_declines_unlike_samples():
    rows = [torch.tensor([[0, 1], [2, 3], [1, 2]])]
    assert uniform_language_keep(rows, [(1, 2, 2)] * 3, [8, 4], ShapeCache()) is None  # 2 images, then 1


def test_clip_cut_rows_equals_the_mask_cut():
    model = tiny_llava(layers=2)
    cut = adapter_for(model).vision_cut()
    pixels = torch.zeros(3, 3, 56, 56)
    grid = cut.call_grid((pixels,), {})
    units = cut.call_units(grid, (pixels,), {})
    assert units == cut.units(grid) == [(1, 4, 4)] * 3
    rows = torch.tensor([[0, 3, 7], [1, 2, 15], [4, 5, 6]])
    keep = torch.zeros(3, 16, dtype=torch.bool).scatter_(1, rows, True).view(-1)
    lean, full = cut.cut_rows(grid, units, rows), cut.cut(grid, keep)
    assert torch.equal(lean.index, full.index) and torch.equal(lean.keep, full.keep)
    assert torch.equal(lean.patches, full.patches)
    hidden = torch.randn(3, 17, 8)
    assert torch.equal(cut.cut_hidden(lean, hidden), cut.cut_hidden(full, hidden))
    kept = cut.cut_hidden(lean, hidden)
    assert torch.equal(cut.unit_features(kept, grid, lean, per_image=True).view(-1, 8),
                       cut.unit_features(kept, grid, full))


def test_images_and_videos_of_one_forward_land_on_their_own_slots():
    """Qwen encodes every image, then every video (two calls): the kept units of each call must reach
    that modality's placeholders, whatever the reading order (here a video before an image)."""
    from tests.engine.test_vit_stages import _model
    from tests.tiny import IMAGE_TOKEN, VIDEO_TOKEN, qwen_media_inputs

    import pruneware

    model = _model("qwen2.5-vl")
    inputs = qwen_media_inputs(model, [[3, ("video", 2, 8, 12), 2, ("image", 8, 8), 4]])
    with torch.no_grad(), pruneware.prune(model, "random@vit1:0.5") as run:
        model(**inputs, use_cache=False)
    kept = run.report.stages[0].kept[0]
    ids = inputs["input_ids"][0]
    assert int((ids[kept] == VIDEO_TOKEN).sum()) == 24  # 2 frames x 24 units, half of each
    assert int((ids[kept] == IMAGE_TOKEN).sum()) == 8  # 16 units, half


def test_a_flat_video_before_a_noisy_image_keeps_its_own_anchors():
    """The same with pixelprune at pre-vit (kept counts per image differ: the general path): a flat
    video keeps one anchor per frame, the noisy image all its units, each on its own placeholders."""
    from tests.engine.test_vit_stages import _model
    from tests.tiny import IMAGE_TOKEN, VIDEO_TOKEN, qwen_media_inputs

    import pruneware

    model = _model("qwen2.5-vl")
    inputs = qwen_media_inputs(model, [[3, ("video", 2, 8, 12), 2, ("image", 8, 8), 4]])
    inputs["pixel_values_videos"] = torch.full_like(inputs["pixel_values_videos"], 0.5)
    with torch.no_grad(), pruneware.prune(model, "pixelprune@pre-vit:1.0") as run:
        model(**inputs, use_cache=False)
    kept = run.report.stages[0].kept[0]
    ids = inputs["input_ids"][0]
    assert int((ids[kept] == VIDEO_TOKEN).sum()) == 2 and int((ids[kept] == IMAGE_TOKEN).sum()) == 16
