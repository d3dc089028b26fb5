"""`pdrop` (PyramidDrop) keeps what a hand computation on eager attention weights keeps, and what
a transcript of the official layer loop keeps; the preset scales, solves avg_tokens, generates."""

from __future__ import annotations

import pytest
import torch

import pruneware
from pruneware.kernels import dispatch
from pruneware.plans.presets import get_preset
from pruneware.policies import split_budget
from tests.official import official_pdrop_kept
from tests.reference import kept_positions, pad_batch, record_lm_inputs, reference_logits
from tests.tiny import IMAGE_TOKEN, llava_inputs, qwen_inputs, tiny_llava, tiny_qwen


def model_and_samples(family: str, attn: str = "eager"):
    """A model and three samples: text around one image, and two images in the third."""
    if family == "llava":
        model = tiny_llava(attn)
        return model, [llava_inputs(model, [(5, 1, 9)], seed=1), llava_inputs(model, [(2, 1, 4)], seed=2),
                       llava_inputs(model, [(3, 2, 3)], seed=3)]
    model = tiny_qwen(attn)
    return model, [qwen_inputs(model, [(4, [(8, 12)], 9)], seed=1), qwen_inputs(model, [(2, [(8, 8)], 4)], seed=2),
                   qwen_inputs(model, [(3, [(4, 8), (8, 8)], 3)], seed=3)]


def by_hand(model, sample: dict, layer: int, count: int) -> torch.Tensor:
    """Layer `layer`'s own eager attention on its unpruned input: the last token's row, summed
    over heads, top-k per image under the split budget."""
    with torch.no_grad():
        attn = model(**sample, output_attentions=True).attentions[layer][0]  # [H, L, L]
    ids = sample["input_ids"][0]
    visual = (ids == IMAGE_TOKEN).nonzero().squeeze(1)
    score = attn[:, -1, visual].sum(0)
    image = torch.cat([torch.tensor([0]), (visual.diff() > 1).long().cumsum(0)])  # images are separated by text
    sizes = torch.bincount(image).tolist()
    parts = []
    for i, k in enumerate(split_budget(sizes, count)):
        members = (image == i).nonzero().squeeze(1)
        parts.append(visual[members[score[members].topk(k).indices]])
    return torch.cat(parts).sort().values


@pytest.mark.parametrize("family", ["llava", "qwen"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("layer", [0, 3])
def test_selection_matches_hand_computation_on_a_padded_batch(family, backend, layer):
    model, samples = model_and_samples(family)
    expected = [by_hand(model, s, layer, 7) for s in samples]
    batch = pad_batch(samples)
    model.set_attn_implementation(backend)
    with pruneware.prune(model, f"pdrop@{layer}:7") as run, torch.no_grad():
        model(**batch)
    for b, sample in enumerate(samples):
        offset = batch["input_ids"].shape[1] - sample["input_ids"].shape[1]
        assert torch.equal(run.report.stages[0].kept[b] - offset, expected[b]), f"sample {b}"


def test_the_previous_layer_would_pick_other_tokens():
    """pdrop reads layer K's own attention; FastV's layer K-1 picks differently here, so the
    comparison above tells the two apart."""
    model, samples = model_and_samples("llava")
    assert not torch.equal(by_hand(model, samples[0], 3, 7), by_hand(model, samples[0], 2, 7))


@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_llava_matches_the_official_layer_loop(kernels, backend, monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, kernels)
    model, samples = model_and_samples("llava")
    samples = samples[:2]  # the official code handles one image per sample
    layers, ratios = [2, 3, 5], [0.5, 0.25, 0.125]
    official = [official_pdrop_kept(model, s, layers, ratios) for s in samples]
    assert [k.numel() for k in official[0]] == [8, 4, 2]
    batch = pad_batch(samples)
    model.set_attn_implementation(backend)
    plan = ",".join(f"pdrop@{layer}:{r}:compact" for layer, r in zip(layers, ratios, strict=True))
    with pruneware.prune(model, plan) as run, torch.no_grad():
        model(**batch)
    for b, sample in enumerate(samples):
        offset = batch["input_ids"].shape[1] - sample["input_ids"].shape[1]
        for stage, want in zip(run.report.stages, official[b], strict=True):
            assert torch.equal(stage.kept[b] - offset, want.sort().values)


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_pruned_forward_matches_reference(family):
    """Layer K runs on the kept tokens only: the preview leaves no trace in the outputs."""
    model, samples = model_and_samples(family, "sdpa")
    sample = samples[0]
    seen = record_lm_inputs(model, sample)
    with pruneware.prune(model, "pdrop@2:0.5,pdrop@4:0.25") as run, torch.no_grad():
        got = model(**sample).logits
    stages = [(s.where, kept_positions(sample["input_ids"][0], [IMAGE_TOKEN], s.kept[0])) for s in run.report.stages]
    torch.testing.assert_close(got, reference_logits(model, seen, stages), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_cached_generate_matches_a_reference_on_the_kept_tokens(family):
    """Each decode step equals a plain layer loop over prompt + generated tokens that drops the
    visual tokens the prefill dropped. (An uncached recomputation would not do: its last token,
    and so its ranking, changes every step.)"""
    model, samples = model_and_samples(family, "sdpa")
    sample, steps = samples[0], 4
    compact = family == "llava"
    plan = "pdrop@2:0.5:compact,pdrop@4:0.25:compact" if compact else "pdrop@2:0.5,pdrop@4:0.25"
    with pruneware.prune(model, plan) as run, torch.no_grad():
        out = model.generate(**sample, max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    kept = [(s.where, s.kept[0]) for s in run.report.stages]
    length = sample["input_ids"].shape[1]
    for t in range(steps):
        seq = out.sequences[:, : length + t]
        inputs = {**sample, "input_ids": seq, "attention_mask": torch.ones_like(seq)}
        if "mm_token_type_ids" in sample:
            inputs["mm_token_type_ids"] = torch.nn.functional.pad(sample["mm_token_type_ids"], (0, t))
        stages = [(where, kept_positions(seq[0], [IMAGE_TOKEN], k)) for where, k in kept]
        with torch.no_grad():
            want = reference_logits(model, record_lm_inputs(model, inputs), stages, compact=compact)[0, -1]
        torch.testing.assert_close(out.logits[t][0], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_preset_with_avg_tokens_generates_a_padded_batch(family):
    model, samples = model_and_samples(family, "sdpa")
    batch = pad_batch(samples[:2])
    n_visual = int((samples[0]["input_ids"] == IMAGE_TOKEN).sum())
    with pruneware.prune(model, "pdrop", avg_tokens=n_visual / 2) as run, torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)
    rope = "1d" if family == "llava" else "mrope"
    assert [s.where for s in run.report.stages] == get_preset("pdrop").layers(6, rope)
    assert run.report.stages[0].policy == "pdrop"


def test_preset_follows_the_official_layers_ratios_and_positions():
    plan = get_preset("pdrop").build(32)
    assert str(plan) == "pdrop@8:0.5:compact,pdrop@16:0.25:compact,pdrop@24:0.125:compact"
    assert plan.keep_counts(576) == [288, 144, 72]
    assert [s.where for s in get_preset("pdrop").build(28, rope="mrope").stages] == [7, 14, 21]
    assert {s.positions for s in get_preset("pdrop").build(28, rope="mrope").stages} == {"keep"}
    solved = get_preset("pdrop").build(32, avg_tokens=192, n_visual=576)
    assert abs(solved.avg_visual_tokens(576, 32) - 192) < 1
    # The first quarter of the layers sees every token, so the average cannot go below ~145.
    with pytest.raises(pruneware.PlanError, match=r"avg_tokens=64 is out of reach .* \[144.8, 576\]"):
        get_preset("pdrop").build(32, avg_tokens=64, n_visual=576)


def test_pdrop_cannot_run_before_the_llm():
    with pytest.raises(pruneware.PlanError, match="pdrop.*inside the language model.*K >= 1"):
        pruneware.prune(tiny_llava(), "pdrop@pre:0.5")
