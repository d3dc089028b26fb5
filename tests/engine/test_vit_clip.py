"""Vision-side stages on LLaVA-1.5's CLIP tower: [CLS] and the kept patches from layer K on.

A 4-layer CLIP read at `vision_feature_layer=-2` (the output of layer 2, as LLaVA-1.5 reads its
24-layer tower), so vit3 cuts after the feature layer and vit0..vit2 before it. The reference
runs the HF modules by hand: embeddings, layers[:K] on every patch, layers[K:] on [CLS] and the
kept patches, the feature layer's kept rows through the projector, the LM on the kept positions.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlavaForConditionalGeneration

import pruneware
from pruneware.models.tiny_configs import tiny_config
from tests.reference import kept_positions, record_lm_inputs, reference_logits
from tests.tiny import IMAGE_TOKEN, PAD, llava_inputs

CLIP_LAYERS = 4


def _model(attn: str = "sdpa"):
    torch.manual_seed(0)
    config = tiny_config(
        "llava", layers=2, max_positions=2048, text={"pad_token_id": PAD}, ids={"image": IMAGE_TOKEN},
        vision={"image_size": 56, "num_hidden_layers": CLIP_LAYERS}, vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn
    model = LlavaForConditionalGeneration(config).eval()
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


def reference_features(model, pixels: torch.Tensor, block: int, kept: torch.Tensor) -> torch.Tensor:
    """[n, k, D] projected features of each image's kept patches (kept: [n, 16] bool, same count per image)."""
    tower = model.model.vision_tower
    x = tower.pre_layrnorm(tower.embeddings(pixels))  # [n, 17, d]
    rows = torch.cat([torch.zeros(kept.shape[0], 1, dtype=torch.long), kept.nonzero()[:, 1].view(kept.shape[0], -1) + 1], 1)
    feature_at = CLIP_LAYERS - 2  # hidden_states[-2]: the output of layer n - 2
    feature = None
    for i, layer in enumerate(tower.encoder.layers):
        if i == block:
            x = torch.stack([x[b, rows[b]] for b in range(x.shape[0])])
        x = layer(x, None)
        if i == feature_at:
            feature = x if i >= block else torch.stack([x[b, rows[b]] for b in range(x.shape[0])])
    return model.model.multi_modal_projector(feature[:, 1:])


def _check(model, inputs, plan):
    out, report = _run(model, inputs, plan)
    stage = report.stages[0]
    block = 0 if stage.where == "pre-vit" else int(stage.where[3:])
    ids = inputs["input_ids"]
    kept_flags = []
    for b in range(ids.shape[0]):
        visual = (ids[b] == IMAGE_TOKEN).nonzero().squeeze(1)
        kept_flags.append(torch.isin(visual, stage.kept[b]).view(-1, 16))
    kept = torch.cat(kept_flags)
    with torch.no_grad():
        feats = reference_features(model, inputs["pixel_values"], block, kept)
        seen_all = record_lm_inputs(model, inputs)
    image = 0
    for b in range(ids.shape[0]):
        visual = (ids[b] == IMAGE_TOKEN).nonzero().squeeze(1).view(-1, 16)
        embeds = seen_all["embeds"][b : b + 1].clone()
        for slots in visual:
            embeds[0, slots[kept[image]]] = feats[image].to(embeds.dtype)
            image += 1
        real = inputs["attention_mask"][b].bool()
        seen = {"embeds": embeds[:, real], "positions": None}
        ref = reference_logits(model, seen, [(0, kept_positions(ids[b, real], [IMAGE_TOKEN], stage.kept[b] - int((~real).sum())))])
        torch.testing.assert_close(out[b, -ref.shape[1]:], ref[0], atol=1e-5, rtol=1e-5)
    return report


@pytest.mark.parametrize("where", ["pre-vit", "vit0", "vit2", "vit3"])
def test_keep_all_is_bit_identical(model, where):
    inputs = llava_inputs(model, [(3, 2, 4)])
    ref, _ = _run(model, inputs)
    out, _ = _run(model, inputs, f"random@{where}:1.0")
    assert torch.equal(out, ref)


@pytest.mark.parametrize("plan", ["random@vit0:0.5", "divprune@vit2:0.25", "fastervlm@vit2:0.5", "random@vit3:5",
                                  "random@pre-vit:0.75"])
def test_pruned_tower_equals_the_reference(model, plan):
    _check(model, llava_inputs(model, [(3, 1, 4)]), plan)


def test_two_images_in_a_padded_batch(model):
    report = _check(model, llava_inputs(model, [(3, 2, 4), (6, 1, 2)]), "random@vit1:0.5")
    assert report.stages[0].n_after == [16, 8]


def test_vision_flops_are_what_ran():
    model = _model(attn="eager")
    inputs = llava_inputs(model, [(3, 2, 4)])
    for plan in ["random@vit1:1.0", "random@vit1:0.25", "random@pre-vit:0.5"]:
        with torch.no_grad(), pruneware.prune(model, plan) as run, FlopCounterMode(display=False) as counter:
            model(**inputs, use_cache=False)
        counts = counter.get_flop_counts()
        vision = sum(sum(v.values()) for k, v in counts.items() if k.endswith(("model.vision_tower", "model.multi_modal_projector")))
        assert sum(run.report.vision_flops) == pytest.approx(float(vision))
    assert run.report.vision_flops[0] < pruneware.adapters.adapter_for(model).input_vision_flops(inputs)[0]


def test_a_tower_without_a_cls_token_is_refused():
    model = _model()
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(pruneware.PlanError, match="vision_feature_select_strategy='default'"):
        pruneware.prune(model, "random@vit1:0.5").__enter__()
    assert not model.model.vision_tower._forward_pre_hooks
