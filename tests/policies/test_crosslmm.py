"""CrossLMM merging: identity at factor 1 / gate 0, M-RoPE positions of the pooled grid,
uneven grids, padded batches, generation, and the trained compressor's file format."""

from __future__ import annotations

import json

import pytest
import torch

import pruneware
from pruneware.policies.crosslmm.compressor import (
    CompressorError, V2VCompressor, live_compressor, load_compressor, save_compressor,
)
from pruneware.policies import StageInput
from pruneware.policies.crosslmm import CrossLMMPolicy
from pruneware.policies.pooling import (
    batch_firsts, cross_attend, cross_attend_batched, pool_grid, pool_grids, pooled_shape,
)
from pruneware.policies.resize import ResizePolicy
from tests.reference import pad_batch, uncached_greedy
from tests.engine.test_equivalence import logits, make
from tests.tiny import qwen_inputs, tiny_qwen


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_factor_one_with_gate_zero_reproduces_unpruned_logits(family):
    model, inputs, _ = make(family)
    expected = logits(model, inputs)
    with pruneware.prune(model, "crosslmm[factor=1;gate=0.0]@pre:1.0"):
        assert torch.equal(logits(model, inputs), expected)


@pytest.mark.parametrize("family", ["llava", "qwen"])
@pytest.mark.parametrize("plan", ["crosslmm@pre:1.0", "crosslmm[gate=1.0]@pre:1.0", "crosslmm[factor=1]@pre:0.5"])
def test_an_image_that_is_not_pooled_is_not_refined(family, plan):
    """Keep-everything is the unpruned model: an unpooled grid passes through unchanged."""
    model, inputs, _ = make(family)
    expected = logits(model, inputs)
    with pruneware.prune(model, plan) as run:
        got = logits(model, inputs)
    assert run.report.stages[0].n_after == run.report.stages[0].n_before
    assert torch.equal(got, expected)


def test_pooled_positions_match_a_genuinely_lower_resolution_image():
    model = tiny_qwen()
    full = qwen_inputs(model, [(3, [(8, 12)], 5)])  # 4 x 6 merged tokens
    low = qwen_inputs(model, [(3, [(4, 6)], 5)])  # 2 x 3 merged tokens: the pooled grid
    expected, _ = model.model.get_rope_index(
        low["input_ids"], mm_token_type_ids=low["mm_token_type_ids"], image_grid_thw=low["image_grid_thw"],
        attention_mask=low["attention_mask"],
    )
    seen = {}
    with pruneware.prune(model, "crosslmm[factor=2]@pre:1.0"):
        def record(module, args, kwargs):
            seen["positions"] = kwargs["position_ids"]

        hook = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
        logits(model, full)
        hook.remove()
    assert torch.equal(seen["positions"], expected)


def test_pooled_positions_under_generate_continue_from_the_pooled_grid():
    model, inputs, _ = make("qwen")
    with pruneware.prune(model, "crosslmm[factor=2]@pre:1.0"):
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        ids, uncached = uncached_greedy(model, inputs, 4)
    assert torch.equal(out.sequences, ids)
    torch.testing.assert_close(torch.stack(out.logits, 1), uncached, atol=1e-4, rtol=1e-4)


def test_uneven_grid_uses_adaptive_bins_and_first_tokens():
    h, w, ph, pw = 5, 7, 2, 3
    x = torch.randn(h * w, 4)
    pooled, first = pool_grid(x, h, w, ph, pw)
    grid = x.reshape(h, w, 4)
    for i in range(ph):
        r0, r1 = (i * h) // ph, -((-(i + 1) * h) // ph)
        for j in range(pw):
            c0, c1 = (j * w) // pw, -((-(j + 1) * w) // pw)
            torch.testing.assert_close(pooled[i * pw + j], grid[r0:r1, c0:c1].reshape(-1, 4).mean(0))
            assert first[i * pw + j] == r0 * w + c0
    assert pooled_shape(24, 24, 64) == (8, 8)
    assert pooled_shape(4, 6, 6) == (2, 3)
    assert pooled_shape(5, 7, 100, factor=3) == (2, 3)


@pytest.mark.parametrize("family", ["llava", "qwen"])
@pytest.mark.parametrize("plan", ["crosslmm[factor=3]@pre:1.0", "crosslmm@pre:0.25"])
def test_padded_batch_equals_samples_alone(family, plan):
    model, _, samples = make(family)
    batch = pad_batch(samples)
    with pruneware.prune(model, plan):
        batched = logits(model, batch)
        for b, sample in enumerate(samples):
            alone = logits(model, sample)
            torch.testing.assert_close(batched[b, -alone.shape[1]:], alone[0], atol=2e-5, rtol=1e-4)


def test_merging_refuses_in_llm_stages():
    model, _, _ = make("llava")
    with pytest.raises(pruneware.PlanError, match="runs only at 'pre'"):
        pruneware.prune(model, "crosslmm@2:0.25")


def test_compressor_round_trip_is_exact(tmp_path):
    compressor = V2VCompressor(64, 8)
    with torch.no_grad():
        compressor.gate.fill_(0.3)
    save_compressor(compressor, tmp_path)
    loaded = load_compressor(tmp_path, 64)
    for (name, a), (_, b) in zip(compressor.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    pooled, tokens = torch.randn(4, 64), torch.randn(16, 64)
    assert torch.equal(compressor(pooled, tokens), loaded(pooled, tokens))


@pytest.mark.parametrize("key", ["compressor", "adapter"])  # `adapter=` is the documented older spelling
def test_trained_compressor_runs_in_a_plan_and_gate_zero_is_pooling(tmp_path, key):
    model, inputs, _ = make("llava")
    save_compressor(V2VCompressor(64, 8), tmp_path)  # untrained: gate 0
    with pruneware.prune(model, f"crosslmm[{key}={tmp_path}]@pre:4"):
        trained = logits(model, inputs)
    with pruneware.prune(model, "crosslmm[gate=0.0]@pre:4"):
        pooled = logits(model, inputs)
    torch.testing.assert_close(trained, pooled)


def test_compressor_given_under_both_names_is_refused(tmp_path):
    model, _, _ = make("llava")
    with pytest.raises(pruneware.PlanError, match="give the trained compressor once"):
        pruneware.prune(model, f"crosslmm[compressor={tmp_path};adapter={tmp_path}]@pre:4")


def test_bad_compressor_files_get_clear_errors(tmp_path):
    model, inputs, _ = make("llava")
    with pytest.raises(CompressorError, match="is not a CrossLMM compressor"):
        with pruneware.prune(model, f"crosslmm[adapter={tmp_path / 'missing'}]@pre:4"):
            logits(model, inputs)
    save_compressor(V2VCompressor(32, 8), tmp_path / "narrow")
    with pytest.raises(CompressorError, match="width 32, but this model's are 64"):
        with pruneware.prune(model, f"crosslmm[adapter={tmp_path / 'narrow'}]@pre:4"):
            logits(model, inputs)
    broken = tmp_path / "broken"
    save_compressor(V2VCompressor(64, 8), broken)
    config = json.loads((broken / "crosslmm_adapter.json").read_text())
    config["rank"] = 16
    (broken / "crosslmm_adapter.json").write_text(json.dumps(config))
    with pytest.raises(CompressorError, match="do not match the config's shapes"):
        load_compressor(broken, 64)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "crosslmm_adapter.json").write_text("{not json")
    (tmp_path / "junk" / "crosslmm_adapter.safetensors").write_bytes(b"nope")
    with pytest.raises(CompressorError, match="malformed compressor config"):
        load_compressor(tmp_path / "junk", 64)


def test_distillation_lowers_the_kl_on_a_tiny_model():
    from pruneware.tuning.crosslmm import answer_kl

    model, inputs, _ = make("llava")
    model.requires_grad_(False)
    compressor = V2VCompressor(64, 8)
    optimizer = torch.optim.Adam(compressor.parameters(), lr=3e-2)

    with torch.no_grad():
        teacher = model(**inputs).logits
    losses = []
    with live_compressor(compressor) as key:
        for _ in range(12):
            with pruneware.prune(model, f"crosslmm[compressor={key}]@pre:4"):
                loss = answer_kl(teacher, model(**inputs).logits, [3])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_video_frames_pool_per_frame_with_temporal_positions_kept():
    from tests.tiny import qwen_media_inputs

    model = tiny_qwen()
    full = qwen_media_inputs(model, [[3, ("video", 3, 8, 12), 4]])  # 3 time steps of 4 x 6 tokens
    low = qwen_media_inputs(model, [[3, ("video", 3, 4, 6), 4]])  # the pooled grid: 3 x (2 x 3)
    expected, _ = model.model.get_rope_index(
        low["input_ids"], mm_token_type_ids=low["mm_token_type_ids"], video_grid_thw=low["video_grid_thw"],
        attention_mask=low["attention_mask"],
    )
    seen = {}
    with pruneware.prune(model, "crosslmm[factor=2]@pre:1.0") as run:
        def record(module, args, kwargs):
            seen["positions"] = kwargs["position_ids"]

        hook = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
        logits(model, full)
        hook.remove()
        out = model.generate(**full, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
        ids, uncached = uncached_greedy(model, full, 3)
    assert run.report.stages[0].n_after == [18]  # 6 tokens per time step
    assert torch.equal(seen["positions"], expected)
    assert torch.equal(out.sequences, ids)
    torch.testing.assert_close(torch.stack(out.logits, 1), uncached, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("h", "w", "ph", "pw"), [(5, 7, 2, 3), (24, 24, 12, 12), (3, 3, 1, 1)])
def test_batched_pooling_equals_pooling_each_image(h, w, ph, pw):
    x = torch.randn(3, h * w, 8, generator=torch.Generator().manual_seed(h * w))
    pooled, first = pool_grids(x, h, w, ph, pw), batch_firsts(3, h, w, ph, pw, x.device)[1]
    attended = cross_attend_batched(pooled, x)
    for b in range(3):
        one, firsts = pool_grid(x[b], h, w, ph, pw)
        assert torch.equal(first[b], firsts)
        torch.testing.assert_close(pooled[b], one, atol=1e-6, rtol=1e-6)  # the same bins (summed in another order)
        torch.testing.assert_close(attended[b], cross_attend(one, x[b]), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("policy", [CrossLMMPolicy(), CrossLMMPolicy(factor=2, gate=0.3), CrossLMMPolicy(factor=1),
                                    ResizePolicy()])
def test_one_image_per_sample_merges_as_the_per_image_loop_does(policy):
    """The batched path (sizes known on the host, one grid and one budget) keeps the loop's slots
    and states; without host sizes the loop runs."""
    batch, h, w = 2, 6, 5
    hidden = torch.randn(batch, h * w, 8, generator=torch.Generator().manual_seed(1))

    def stage_input(sizes):
        return StageInput(hidden, torch.ones(batch, h * w, dtype=torch.bool), torch.zeros(batch, h * w, dtype=torch.long),
                          None, 0, 0, grids=[[(h, w)]] * batch, sizes=sizes)

    fast = policy.merge(stage_input([[h * w]] * batch), [7, 7])
    loop = policy.merge(stage_input(None), [7, 7])
    assert isinstance(fast.keep, torch.Tensor) and isinstance(loop.keep, list)
    assert fast.grids == loop.grids
    for b in range(batch):
        assert torch.equal(fast.keep[b], loop.keep[b])
        torch.testing.assert_close(fast.embeds[b], loop.embeds[b], atol=1e-6, rtol=1e-5)
