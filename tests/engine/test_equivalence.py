"""The backbone: pruned runs equal independent references (STYLE.md #6).

Covers both model families, sdpa and eager attention, pre-LLM and in-LLM stages, multi-stage
plans, `keep` and `compact` positions, cached generation and left-padded batches.
"""

from __future__ import annotations

import pytest
import torch

import pruneware
from tests.reference import kept_positions, pad_batch, record_lm_inputs, reference_logits, uncached_greedy
from tests.tiny import IMAGE_TOKEN, llava_inputs, qwen_inputs, tiny_llava, tiny_qwen

ATTN = ["sdpa", "eager"]


def make(family: str, attn: str = "sdpa"):
    if family == "llava":
        model = tiny_llava(attn)
        return model, llava_inputs(model, [(4, 1, 5)]), [
            llava_inputs(model, [(2, 1, 7)], seed=1), llava_inputs(model, [(6, 1, 2)], seed=2),
            llava_inputs(model, [(3, 2, 3)], seed=3),
        ]
    model = tiny_qwen(attn)
    return model, qwen_inputs(model, [(3, [(8, 12)], 5)]), [
        qwen_inputs(model, [(2, [(8, 8)], 6)], seed=1), qwen_inputs(model, [(5, [(8, 12)], 2)], seed=2),
        qwen_inputs(model, [(3, [(4, 8), (8, 8)], 3)], seed=3),
    ]


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family", ["llava", "qwen"])
@pytest.mark.parametrize("plan", ["random@pre:1.0", "random@2:1.0", "divprune@pre:1.0,fastv@3:1.0"])
def test_keep_all_is_bit_identical(family, plan):
    model, inputs, _ = make(family)
    expected = logits(model, inputs)
    with pruneware.prune(model, plan):
        got = logits(model, inputs)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", ["llava", "qwen"])
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize(
    "plan",
    ["divprune@pre:0.3", "random@2:0.4", "fastv@3:6", "divprune@pre:0.5,random@4:0.25", "adaptinfer@1:0.5,adaptinfer@3:4"],
)
def test_pruned_forward_matches_reference(family, attn, plan):
    model, inputs, _ = make(family, attn)
    seen = record_lm_inputs(model, inputs)
    with pruneware.prune(model, plan, seed=3) as run:
        got = logits(model, inputs)
    stages = []
    for stage in run.report.stages:
        layer = 0 if stage.where == "pre" else stage.where
        stages.append((layer, kept_positions(inputs["input_ids"][0], [IMAGE_TOKEN], stage.kept[0])))
        assert stage.n_after[0] == len(stage.kept[0]) < stage.n_before[0]
    expected = reference_logits(model, seen, stages)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_compact_positions_match_reference_on_llava():
    model, inputs, _ = make("llava")
    seen = record_lm_inputs(model, inputs)
    with pruneware.prune(model, "random@3:0.25:compact", seed=1) as run:
        got = logits(model, inputs)
    kept = kept_positions(inputs["input_ids"][0], [IMAGE_TOKEN], run.report.stages[0].kept[0])
    expected = reference_logits(model, seen, [(3, kept)], compact=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(pruneware.PlanError, match="M-RoPE"):
        pruneware.prune(tiny_qwen(), "random@3:0.25:compact")


@pytest.mark.parametrize("family", ["llava", "qwen"])
@pytest.mark.parametrize(
    "plan", ["divprune@pre:0.4,random@3:0.5", "random@2:0.3:compact", "random@pre:0.5:compact"]
)
def test_cached_generate_equals_uncached_recomputation(family, plan):
    if family == "qwen" and "compact" in plan:
        pytest.skip("compact positions are refused on M-RoPE models")
    model, inputs, _ = make(family)
    with pruneware.prune(model, plan, seed=5):
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
        ids, uncached = uncached_greedy(model, inputs, 5)
    assert torch.equal(out.sequences, ids)
    torch.testing.assert_close(torch.stack(out.logits, 1), uncached, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen"])
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize(
    "plan", ["divprune@pre:0.3", "fastv@2:0.3", "divprune@pre:0.5,random@4:0.25", "adaptinfer@1:0.5,adaptinfer@3:0.2"]
)
def test_padded_batch_equals_samples_alone(family, attn, plan):
    model, _, samples = make(family, attn)
    batch = pad_batch(samples)
    with pruneware.prune(model, plan, seed=2) as run:
        batched = logits(model, batch)
        batched_gen = model.generate(**batch, max_new_tokens=4, do_sample=False)
        batch_kept = [s.kept for s in run.report.stages]
        for b, sample in enumerate(samples):
            alone = logits(model, sample)
            for stage_kept, stage in zip(batch_kept, run.report.stages, strict=True):
                offset = batch["input_ids"].shape[1] - sample["input_ids"].shape[1]
                assert torch.equal(stage_kept[b] - offset, stage.kept[0])
            n = alone.shape[1]
            torch.testing.assert_close(batched[b, -n:], alone[0], atol=2e-5, rtol=1e-4)
            alone_gen = model.generate(**sample, max_new_tokens=4, do_sample=False)
            assert torch.equal(batched_gen[b, -4:], alone_gen[0, -4:])


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_text_only_prompt_is_a_no_op(family):
    model, inputs, _ = make(family)
    text = {"input_ids": inputs["input_ids"][:, :4], "attention_mask": inputs["attention_mask"][:, :4]}
    expected = logits(model, text)
    with pruneware.prune(model, "divprune@pre:0.2,fastv@2:0.2") as run:
        got = logits(model, text)
        model.generate(**text, max_new_tokens=3, do_sample=False)
    assert torch.equal(got, expected)
    assert run.report.avg_visual_tokens == 0


def test_several_images_split_budget_in_proportion():
    model = tiny_llava()
    inputs = llava_inputs(model, [(2, 3, 2)])
    with pruneware.prune(model, "random@pre:7") as run:
        logits(model, inputs)
    kept = run.report.stages[0].kept[0]
    per_image = torch.bincount(
        torch.searchsorted((inputs["input_ids"][0] == IMAGE_TOKEN).nonzero().squeeze(1), kept) // 16, minlength=3
    )
    assert per_image.tolist() in ([3, 2, 2], [2, 3, 2], [2, 2, 3]) and kept.numel() == 7
