"""`dart` keeps what a transcription of DART's official selection keeps, computed from the
model's own cached keys and hidden states; the preset scales, solves avg_tokens, generates."""

from __future__ import annotations

import pytest
import torch

import pruneware
from pruneware.plans.presets import get_preset
from pruneware.policies import split_budget
from tests.official import dart_inputs, official_dart_core
from tests.reference import kept_positions, pad_batch, record_lm_inputs, reference_logits
from tests.tiny import IMAGE_TOKEN, llava_inputs, qwen_inputs, tiny_llava, tiny_qwen


def with_final_norm(model):
    """Give the final norm non-unit weights (a fresh model has ones), so that the cosine
    similarities DART takes after it differ from those on the raw states."""
    with torch.no_grad():
        weight = model.model.language_model.norm.weight
        weight.copy_(torch.rand(weight.shape, generator=torch.Generator().manual_seed(0)) * 2 + 0.1)
    return model


def model_and_samples(family: str, attn: str = "eager"):
    """Two one-image samples (16 / 24 tokens per image) and a third with two images."""
    if family == "llava":
        model = with_final_norm(tiny_llava(attn))
        return model, [llava_inputs(model, [(5, 1, 9)], seed=1), llava_inputs(model, [(2, 1, 6)], seed=2),
                       llava_inputs(model, [(3, 2, 5)], seed=3)]
    model = with_final_norm(tiny_qwen(attn))
    return model, [qwen_inputs(model, [(4, [(8, 12)], 9)], seed=1), qwen_inputs(model, [(2, [(8, 12)], 6)], seed=2),
                   qwen_inputs(model, [(3, [(8, 8), (8, 8)], 5)], seed=3)]


def padded(samples: list[dict]) -> dict:
    """A left-padded batch whose real tokens keep the positions they have alone, as `generate`
    gives them. DART reads post-RoPE key norms, which depend on absolute positions, so a plain
    forward (positions 0..L-1 over the padding too) would rank keys differently."""
    batch = pad_batch(samples)
    if "image_grid_thw" not in batch:  # Qwen's M-RoPE positions already skip the padding
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return batch


def official(model, sample: dict, layer: int, count: int, p_img: int, p_txt: int) -> torch.Tensor:
    """The official rule per image (text pivots from the text after the last image), each image
    with its share of `count`; shares must be p_img + a multiple of p_img + p_txt."""
    states, keys = dart_inputs(model, sample, layer)
    ids = sample["input_ids"][0]
    visual = (ids == IMAGE_TOKEN).nonzero().squeeze(1)
    query = torch.arange(int(visual.max()) + 1, ids.numel()).tolist()
    image = torch.cat([torch.tensor([0]), (visual.diff() > 1).long().cumsum(0)])
    kept = []
    for i, k in enumerate(split_budget(torch.bincount(image).tolist(), count)):
        if k >= int((image == i).sum()):
            kept += visual[image == i].tolist()
            continue
        topk, rest = divmod(k - p_img, p_img + p_txt)
        assert rest == 0, "choose budgets the official TOKEN_TOPK expresses"
        kept += official_dart_core(states, keys, visual[image == i].tolist(), query, p_img, p_txt, topk)
    return torch.tensor(sorted(kept))


CASES = [  # (family, plan, count per sample, pivots)
    ("llava", "dart@2:12", 12, (4, 4)),
    ("llava", "dart[pivot_image=2;pivot_text=3]@3:12", 12, (2, 3)),
    ("qwen", "dart@2:20", 20, (4, 4)),
    ("qwen", "dart[pivot_image=1;pivot_text=1]@2:9", 9, (1, 1)),
]


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize(("family", "plan", "count", "pivots"), CASES)
def test_selection_matches_the_official_rule_on_a_padded_batch(family, plan, count, pivots, backend):
    model, samples = model_and_samples(family)
    layer = int(plan.split("@")[1].split(":")[0])
    samples = samples[:2]
    expected = [official(model, s, layer, count, *pivots) for s in samples]
    batch = padded(samples)
    model.set_attn_implementation(backend)
    with pruneware.prune(model, plan) as run, torch.no_grad():
        model(**batch)
    for b, sample in enumerate(samples):
        offset = batch["input_ids"].shape[1] - sample["input_ids"].shape[1]
        assert torch.equal(run.report.stages[0].kept[b] - offset, expected[b]), f"sample {b}"


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_several_images_share_the_budget_and_the_text_pivots(family):
    model, samples = model_and_samples(family)
    count = 24  # two images of 16 tokens: 12 each; the one-image sample keeps its 16 (LLaVA) or 24 (Qwen)
    expected = [official(model, s, 2, count, 4, 4) for s in samples[1:]]
    batch = padded(samples[1:])
    with pruneware.prune(model, f"dart@2:{count}") as run, torch.no_grad():
        model(**batch)
    for b, sample in enumerate(samples[1:]):
        offset = batch["input_ids"].shape[1] - sample["input_ids"].shape[1]
        assert torch.equal(run.report.stages[0].kept[b] - offset, expected[b]), f"sample {b}"


def test_budgets_the_official_rule_cannot_express_are_met_exactly():
    model, samples = model_and_samples("llava", "sdpa")
    for count in (1, 3, 5, 13, 15):
        with pruneware.prune(model, f"dart@2:{count}") as run, torch.no_grad():
            model(**samples[0])
        assert run.report.stages[0].kept[0].numel() == count


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_cached_generate_matches_a_reference_on_the_kept_tokens(family):
    model, samples = model_and_samples(family, "sdpa")
    sample, steps = samples[0], 3
    with pruneware.prune(model, "dart@2:0.5") as run, torch.no_grad():
        out = model.generate(**sample, max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    kept = run.report.stages[0].kept[0]
    length = sample["input_ids"].shape[1]
    for t in range(steps):
        seq = out.sequences[:, : length + t]
        inputs = {**sample, "input_ids": seq, "attention_mask": torch.ones_like(seq)}
        if "mm_token_type_ids" in sample:
            inputs["mm_token_type_ids"] = torch.nn.functional.pad(sample["mm_token_type_ids"], (0, t))
        stages = [(2, kept_positions(seq[0], [IMAGE_TOKEN], kept))]
        with torch.no_grad():
            want = reference_logits(model, record_lm_inputs(model, inputs), stages)[0, -1]
        torch.testing.assert_close(out.logits[t][0], want, atol=1e-4, rtol=1e-4)


def test_preset_is_the_official_layer_and_ratio_and_takes_avg_tokens():
    assert str(get_preset("dart").build(32)) == "dart@2:0.222"
    solved = get_preset("dart").build(32, avg_tokens=64, n_visual=576)
    assert abs(solved.avg_visual_tokens(576, 32) - 64) < 1
    model, samples = model_and_samples("qwen", "sdpa")
    n_visual = int((samples[0]["input_ids"] == IMAGE_TOKEN).sum())
    with pruneware.prune(model, "dart", avg_tokens=n_visual / 2) as run, torch.no_grad():
        model.generate(**pad_batch(samples[:2]), max_new_tokens=2, do_sample=False)
    assert abs(run.report.avg_visual_tokens - n_visual / 2) <= 1


@pytest.mark.parametrize(
    ("plan", "match"),
    [
        ("dart[pivot_image=-1]@2:8", "pivot_image must be an integer >= 0, got -1"),
        ("dart[pivot_image=0;pivot_text=0]@2:8", "at least one pivot"),
        ("dart@pre:8", "cannot run at 'pre'"),
        ("dart@0:8", "use K >= 1"),
    ],
)
def test_bad_plans_are_named(plan, match):
    with pytest.raises(pruneware.PlanError, match=match):
        pruneware.prune(tiny_llava(), plan)


def test_the_final_norm_changes_the_selection_here():
    """The comparisons above can tell DART's normed similarities from raw ones on these models."""
    model, samples = model_and_samples("llava")
    want = official(model, samples[0], 2, 12, 4, 4)
    norm = model.model.language_model.norm
    saved = norm.weight.detach().clone()
    with torch.no_grad():
        norm.weight.fill_(1.0)
    try:
        assert not torch.equal(official(model, samples[0], 2, 12, 4, 4), want)
    finally:
        with torch.no_grad():
            norm.weight.copy_(saved)


@pytest.mark.parametrize("plan", ["dart@2:12", "random@1:0.8:compact,dart@3:12", "divprune@pre:0.8:compact,dart@2:12"])
def test_a_plain_forward_of_a_padded_batch_keeps_what_each_sample_keeps_alone(plan):
    """A plain forward numbers the padding too, and `compact` numbers padding slots: DART's key
    norms are read at the positions each sample has alone (engine/key_positions.py)."""
    model, samples = model_and_samples("llava", "sdpa")
    batch = pad_batch(samples)  # no position_ids: positions 0..L-1 over the padding
    with pruneware.prune(model, plan, seed=1) as run:
        with torch.no_grad():
            batched = model(**batch).logits
        batch_kept = [s.kept for s in run.report.stages]
        for b, sample in enumerate(samples):
            with torch.no_grad():
                alone = model(**sample).logits
            offset = batch["input_ids"].shape[1] - sample["input_ids"].shape[1]
            for stage_kept, stage in zip(batch_kept, run.report.stages, strict=True):
                assert torch.equal(stage_kept[b] - offset, stage.kept[0]), f"sample {b}: kept indices differ"
            torch.testing.assert_close(batched[b, -1], alone[0, -1], atol=2e-5, rtol=1e-4)
