"""Vision-side stages on LLaVA-NeXT's CLIP tower: every tile keeps [CLS] and its kept patches from layer K on.

A 4-layer CLIP on 42-px tiles (3x3 patches) read at `vision_feature_layer=-2`, so vit3 cuts after
the feature layer and vit0..vit2 before it. Images of 84x20 px (2x1 tiles, high-res 6x3 unpadded to
6x1: two of its three columns are padding), 30x80 px (1x2 tiles, 3x6) and 84x84 px (2x2 tiles, 6x6).
The reference runs the HF modules by hand, tile by tile with no padding: embeddings, layers[:K]
on every patch, layers[K:] on [CLS] and the tile's kept patches (every patch when its image kept
all its units), the feature layer's kept rows through the projector, zeros elsewhere, then HF's
own `pack_image_features` (unpadding, newline rows), and the LM on the kept positions.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlavaNextForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import pruneware
from pruneware.adapters import adapter_for
from pruneware.models.tiny_configs import tiny_config
from pruneware.policies import available
from tests.reference import pad_batch, reference_logits
from tests.tiny import IMAGE_TOKEN, PAD, llava_next_inputs

CLIP_LAYERS = 4
AREA = 9  # patches per 42-px tile


def _model(attn: str = "sdpa"):
    torch.manual_seed(0)
    config = tiny_config(
        "llava-next", layers=2, max_positions=2048, text={"pad_token_id": PAD}, ids={"image": IMAGE_TOKEN},
        vision={"num_hidden_layers": CLIP_LAYERS}, vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_grid_pinpoints=[[42, 84], [84, 42], [84, 84]],
    )
    config._attn_implementation = attn
    model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = PAD
    return model


@pytest.fixture(scope="module")
def model():
    return _model()


def _run(model, inputs, plan=None):
    with torch.no_grad():
        if plan is None:
            return model(**inputs, use_cache=False).logits, None
        with pruneware.prune(model, plan) as run:
            return model(**inputs, use_cache=False).logits, run.report


def _unit_tiles(model, image_sizes: torch.Tensor, n_tiles: list[int]) -> list[torch.Tensor]:
    """Per image, [n_units, 2] the (tile within the image, patch) of each visual token, read from
    HF's own `pack_image_features` run on patch ids (newline rows marked -1 and dropped)."""
    ids = [torch.arange(n * AREA, dtype=torch.float32).view(n, AREA, 1) for n in n_tiles]
    packed, _ = model.model.pack_image_features(ids, image_sizes, "default", torch.tensor([-1.0]))
    return [torch.stack([p[p[:, 0] >= 0, 0].long() // AREA, p[p[:, 0] >= 0, 0].long() % AREA], 1) for p in packed]


def reference_features(model, pixels: torch.Tensor, cuts: list[tuple[int, list[torch.Tensor]]]) -> torch.Tensor:
    """[T, AREA, D] each tile's projected features on its kept patches, zeros elsewhere. cuts: per
    vision-side stage in order, (block, per tile the rows it keeps from that block on: [CLS] = 0
    first, patch p is row p + 1)."""
    tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    out = []
    for t, tile in enumerate(pixels):
        x, rows = tower.pre_layrnorm(tower.embeddings(tile[None])), torch.arange(AREA + 1)
        feature = None
        for i, layer in enumerate(tower.encoder.layers):
            for block, kept in cuts:
                if block == i:
                    x, rows = x[:, torch.isin(rows, kept[t])], kept[t]
            x = layer(x, None)
            if i == CLIP_LAYERS - 2:  # hidden_states[-2]: the output of layer n - 2
                feature = (x, rows)
        last = cuts[-1][1][t]
        full = torch.zeros(AREA, projector.linear_2.out_features)
        full[last[1:] - 1] = projector(feature[0][0, torch.isin(feature[1], last)][1:])
        out.append(full)
    return torch.stack(out)


def _tile_rows(stage, layout, units, n_tiles, ids) -> tuple[list[torch.Tensor], list[tuple[int, torch.Tensor]]]:
    """Per tile of the call, the rows `stage` keeps; per image, (sample, its visual slots)."""
    rows, unit_slots, image = [], [], 0
    for b in range(ids.shape[0]):
        visual = layout.visual[b].nonzero().squeeze(1)
        start = 0
        for counts in torch.bincount(layout.image_ids[b][visual]).split(2):  # base + high-res per image
            slots = visual[start : start + int(counts.sum())]
            kept = torch.isin(slots, stage.kept[b])
            tile_rows = [[0] for _ in range(n_tiles[image])]
            for (tile, patch), flag in zip(units[image].tolist(), kept.tolist(), strict=True):
                if flag:
                    tile_rows[tile].append(patch + 1)
            if bool(kept.all()):  # an image that keeps all its units keeps its tiles whole
                tile_rows = [list(range(AREA + 1)) for _ in tile_rows]
            rows += [torch.tensor(sorted(r)) for r in tile_rows]
            unit_slots.append((b, slots))
            start += int(counts.sum())
            image += 1
    return rows, unit_slots


def _check(model, inputs, plan):
    """The pruned logits equal the hand-run tower and LM on the kept sets the report names."""
    out, report = _run(model, inputs, plan)
    ids, sizes = inputs["input_ids"], inputs["image_sizes"]
    n_tiles = [image_size_to_num_patches(s, model.config.image_grid_pinpoints, 42) for s in sizes.tolist()]
    pixels = torch.cat([p[:n] for p, n in zip(inputs["pixel_values"], n_tiles, strict=True)])
    units = _unit_tiles(model, sizes, n_tiles)
    layout = adapter_for(model).layout(ids, inputs)
    cuts = []
    for stage in (s for s in report.stages if str(s.where).startswith(("vit", "pre-vit"))):
        rows, unit_slots = _tile_rows(stage, layout, units, n_tiles, ids)
        cuts.append((0 if stage.where == "pre-vit" else int(stage.where[3:]), rows))
    with torch.no_grad():
        feats = reference_features(model, pixels, cuts).split(n_tiles)
        packed, _ = model.model.pack_image_features(list(feats), sizes, "default", model.model.image_newline)
        embeds = model.model.get_input_embeddings()(ids)
    image_slots = [(ids[b] == IMAGE_TOKEN).nonzero().squeeze(1) for b in range(ids.shape[0])]
    cursor = [0] * ids.shape[0]
    for (b, _), features in zip(unit_slots, packed, strict=True):
        slots = image_slots[b][cursor[b] : cursor[b] + features.shape[0]]
        embeds[b, slots] = features.to(embeds.dtype)
        cursor[b] += features.shape[0]
    llm_stages = [(0, report.stages[len(cuts) - 1])]  # the vision side's kept units enter as a `pre` stage's
    llm_stages += [(0 if s.where == "pre" else int(s.where), s) for s in report.stages[len(cuts):]]
    for b in range(ids.shape[0]):
        real = inputs["attention_mask"][b].bool()
        pad = int((~real).sum())
        text = (real & ~layout.visual[b]).nonzero().squeeze(1)
        stages = [(layer, torch.cat([text, s.kept[b]]).sort().values - pad) for layer, s in llm_stages]
        stages = list({layer: kept for layer, kept in stages}.items())  # a `pre` stage replaces the vision side's
        with torch.no_grad():
            ref = reference_logits(model, {"embeds": embeds[b : b + 1, real], "positions": None}, stages)
        torch.testing.assert_close(out[b, -ref.shape[1]:], ref[0], atol=1e-5, rtol=1e-5)
    return report


@pytest.mark.parametrize("where", ["pre-vit", "vit0", "vit2", "vit3"])
def test_keep_all_is_bit_identical(model, where):
    inputs = llava_next_inputs(model, [(3, [(84, 20)], 4), (2, [(30, 80), (84, 84)], 1)])
    ref, _ = _run(model, inputs)
    out, report = _run(model, inputs, f"random@{where}:1.0")
    assert torch.equal(out, ref)
    assert report.stages[0].n_after == [9 + 6, 9 + 18 + 9 + 36]  # the padding patches are not units


@pytest.mark.parametrize("plan", ["random@vit0:0.5", "divprune@vit2:0.25", "fastervlm@vit2:0.5", "random@vit3:5",
                                  "random@pre-vit:0.75", "pixelprune@pre-vit:0.8,divprune@vit1:*0.5",
                                  "fastervlm@vit1:0.75,divprune@pre:*0.5,random@1:*0.5"])
def test_pruned_tower_equals_the_reference(model, plan):
    _check(model, llava_next_inputs(model, [(3, [(84, 20)], 4)]), plan)


def test_images_of_different_sizes_in_a_padded_batch_equal_each_alone(model):
    samples = [llava_next_inputs(model, [(3, [(84, 20)], 4)], seed=1),
               llava_next_inputs(model, [(6, [(30, 80), (84, 84)], 2)], seed=2)]
    batch = pad_batch(samples)
    report = _check(model, batch, "divprune@vit1:0.5")
    assert report.stages[0].n_after == [8, 14 + 22]  # per image round(0.5 * n), n = 9 + 6, 9 + 18, 9 + 36
    plan = "divprune@vit1:0.5,random@1:0.5"
    out, _ = _run(model, batch, plan)
    for b, sample in enumerate(samples):
        one, _ = _run(model, sample, plan)
        torch.testing.assert_close(out[b, -one.shape[1]:], one[0], atol=1e-5, rtol=1e-5)


def test_an_attention_read_after_a_cut_is_refused(model):
    inputs = llava_next_inputs(model, [(3, [(84, 20)], 4)])
    with pytest.raises(pruneware.PlanError, match="must be the first vision-side stage"):
        _run(model, inputs, "random@vit1:0.5,fastervlm@vit2:0.5")
    ref, _ = _run(model, inputs)  # the failed forward left nothing behind
    assert torch.equal(_run(model, inputs, "random@vit1:1.0")[0], ref)


@pytest.mark.parametrize("name", sorted(n for n, cls in available().items() if cls.needs.vit))
def test_every_vision_side_policy_runs_on_anyres_tiles(model, name):
    """Registered policies that may run in the tower: a padded batch equals its samples alone, keep-all is exact."""
    where = "pre-vit" if name == "pixelprune" else "vit2"  # pixelprune reads raw pixels: before the tower
    samples = [llava_next_inputs(model, [(3, [(84, 20)], 4)], seed=1),
               llava_next_inputs(model, [(6, [(30, 80), (84, 84)], 2)], seed=2)]
    batch = pad_batch(samples)
    out, report = _run(model, batch, f"{name}@{where}:0.5")
    for b, sample in enumerate(samples):
        one, alone = _run(model, sample, f"{name}@{where}:0.5")
        torch.testing.assert_close(out[b, -one.shape[1]:], one[0], atol=1e-5, rtol=1e-5)
        pad = int((batch["attention_mask"][b] == 0).sum())
        assert torch.equal(report.stages[0].kept[b] - pad, alone.stages[0].kept[0])
    if name != "pixelprune":  # pixelprune drops predictable units even at 1.0
        assert torch.equal(_run(model, batch, f"{name}@{where}:1.0")[0], _run(model, batch)[0])


def test_budgets_match_the_pre_stage(model):
    inputs = llava_next_inputs(model, [(3, [(84, 84)], 4)])
    for budget in ["0.25", "10"]:
        _, vit = _run(model, inputs, f"divprune@vit1:{budget}")
        _, pre = _run(model, inputs, f"divprune@pre:{budget}")
        layout = adapter_for(model).layout(inputs["input_ids"], inputs)
        per_unit = [torch.bincount(layout.image_ids[0][r.stages[0].kept[0]], minlength=2).tolist() for r in (vit, pre)]
        assert per_unit[0] == per_unit[1]


@pytest.mark.parametrize("plan", ["random@vit2:0.5", "divprune@vit1:0.5,random@1:0.5"])
def test_cached_generate_equals_uncached_recomputation(model, plan):
    from tests.reference import uncached_greedy

    inputs = llava_next_inputs(model, [(3, [(84, 20)], 4), (2, [(30, 80)], 1)])
    with torch.no_grad(), pruneware.prune(model, plan):
        cached = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
        ids, logits = uncached_greedy(model, inputs, 4)
    assert torch.equal(cached.sequences, ids)
    torch.testing.assert_close(torch.stack(cached.logits, 1), logits, atol=1e-4, rtol=1e-4)


def test_vision_flops_are_what_ran():
    model = _model(attn="eager")
    inputs = llava_next_inputs(model, [(3, [(84, 20)], 4), (2, [(30, 80)], 1)])
    unpruned = adapter_for(model).input_vision_flops(inputs)
    for plan in ["random@vit1:1.0", "random@vit1:0.25", "random@pre-vit:0.5", "random@pre-vit:0.8,random@vit2:*0.5"]:
        with torch.no_grad(), pruneware.prune(model, plan) as run, FlopCounterMode(display=False) as counter:
            model(**inputs, use_cache=False)
        counts = counter.get_flop_counts()
        vision = sum(sum(v.values()) for k, v in counts.items()
                     if k.endswith(("model.vision_tower", "model.multi_modal_projector")))
        assert sum(run.report.vision_flops) == pytest.approx(float(vision))
        if plan.endswith("1.0"):
            assert run.report.vision_flops == pytest.approx(unpruned)
    assert all(a < b for a, b in zip(run.report.vision_flops, unpruned, strict=True))


def test_a_tower_without_a_cls_token_is_refused():
    model = _model()
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(pruneware.PlanError, match="vision_feature_select_strategy='default'"):
        pruneware.prune(model, "random@vit1:0.5").__enter__()
    assert "get_image_features" not in model.model.__dict__ and not model.model.vision_tower._forward_pre_hooks


def test_the_session_leaves_get_image_features_as_it_found_it(model):
    with pruneware.prune(model, "random@vit1:0.5"):
        assert "get_image_features" in model.model.__dict__
    assert "get_image_features" not in model.model.__dict__
