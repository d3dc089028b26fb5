"""SparseVLM's raters and recycling (``pruneware.kernels.sparsevlm``): the numpy CPU path and the
Triton kernels against the plain-torch reference, on odd sizes, ragged samples, samples without
visual or text slots, half precision and NaN-poisoned outputs.

The Triton kernels run on CPU under ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py`` on
machines without CUDA). Raters and slots are compared exactly; merged states within per-dtype
tolerances. Exact ties among cluster centres (two mutual nearest tokens of equal density, both
denser than the rest) are ordered by torch's top-k in the reference and the CPU path, to the lowest
index in the kernel: there the merged rows are compared as a set.
"""

from __future__ import annotations

import pytest
import torch

import pruneware.kernels.sparsevlm as sparsevlm
from pruneware.kernels import dispatch
from pruneware.kernels.sparsevlm import cpu, reference
from pruneware.kernels.sparsevlm import triton as fused

CUDA = torch.cuda.is_available()
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def rater_case(b: int, length: int, d: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed + 100 * length + d)
    embeds = torch.randn(b, length, d, generator=gen)
    visual = torch.rand(b, length, generator=gen) < 0.5
    text = ~visual & (torch.rand(b, length, generator=gen) < 0.7)
    if b > 1:
        visual[1] = False  # a text-only sample: no raters
    if b > 2:
        text[2] = False  # no candidate rows: no raters
    return embeds, visual, text


def recycle_case(b: int, n: int, d: int, k: int, dtype=torch.float32, seed: int = 0):
    """b samples of n, n - 5, n - 10... tokens, each keeping its top min(k, count - 1)."""
    gen = torch.Generator().manual_seed(seed + 1000 * n + d)
    hidden, scores = torch.randn(b, n, d, generator=gen).to(dtype), torch.rand(b, n, generator=gen)
    counts = [max(n - 5 * i, 1) for i in range(b)]
    kept = [scores[i, :c].topk(min(k, c - 1)).indices.sort().values for i, c in enumerate(counts)]
    return hidden, scores, kept, counts


def assert_same_recycling(got, want, kept, dtype=torch.float32, centre_ties: bool = False):
    atol, rtol = TOL[dtype]
    for b, (slots, states) in enumerate(zip(*want, strict=True)):
        assert torch.equal(got[0][b], slots), f"sample {b}"
        assert not got[1][b].isnan().any(), f"sample {b}: unwritten output"
        is_kept = torch.isin(slots, kept[b])
        assert torch.equal(got[1][b][is_kept], states[is_kept])  # kept states are copied, bit for bit
        mine, theirs = got[1][b][~is_kept].float(), states[~is_kept].float()
        if centre_ties:  # the same merged rows, perhaps in other recycled slots
            mine, theirs = mine[mine[:, 0].argsort()], theirs[theirs[:, 0].argsort()]
        torch.testing.assert_close(mine, theirs, atol=atol, rtol=rtol)


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 9, 5), (3, 40, 17), (2, 333, 64)], ids=str)
def test_raters_cpu_and_triton_match_reference(shape, interpret):
    embeds, visual, text = rater_case(*shape)
    want = reference.text_raters(embeds, visual, text)
    assert want.dtype == torch.bool and want.shape == visual.shape
    assert not (want & ~text).any()
    assert torch.equal(cpu.text_raters(embeds, visual, text), want)
    assert torch.equal(fused.text_raters(embeds, visual, text), want)
    if shape[0] > 1:
        assert not want[1].any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_raters_of_half_precision_embeddings_are_computed_in_float32(dtype, interpret):
    embeds, visual, text = rater_case(2, 41, 24)
    want = reference.text_raters(embeds.to(dtype).float(), visual, text)
    for impl in (reference, cpu, fused):
        assert torch.equal(impl.text_raters(embeds.to(dtype), visual, text), want)


@pytest.mark.parametrize("shape", [(1, 7, 5, 3), (2, 63, 17, 20), (3, 101, 33, 37), (1, 577, 96, 144)], ids=str)
def test_recycle_cpu_path_matches_reference(shape):
    hidden, scores, kept, counts = recycle_case(*shape)
    want = reference.recycle(hidden, scores, kept, counts)
    assert_same_recycling(cpu.recycle(hidden, scores, kept, counts), want, kept)
    for b, (slots, count) in enumerate(zip(want[0], counts, strict=True)):
        pruned = count - kept[b].numel()
        assert slots.numel() == kept[b].numel() + reference.recycled_count(pruned)


@pytest.mark.parametrize("shape", [(1, 7, 5, 3), (2, 63, 17, 20), (3, 101, 33, 37), (1, 130, 40, 1)], ids=str)
def test_recycle_triton_interpreted_matches_reference(shape, interpret, nan_poison):
    hidden, scores, kept, counts = recycle_case(*shape)
    want = reference.recycle(hidden, scores, kept, counts)
    assert_same_recycling(sparsevlm.recycle(hidden, scores, kept, counts), want, kept, centre_ties=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_recycle_in_half_precision(dtype, interpret, nan_poison):
    hidden, scores, kept, counts = recycle_case(2, 63, 24, 20, dtype)
    want = reference.recycle(hidden, scores, kept, counts)
    assert want[1][0].dtype == dtype
    assert_same_recycling(cpu.recycle(hidden, scores, kept, counts), want, kept, dtype)
    assert_same_recycling(fused.recycle(hidden, scores, kept, counts), want, kept, dtype, centre_ties=True)


def test_a_batch_of_equal_widths_comes_back_as_tensors(interpret):
    hidden, scores, _, _ = recycle_case(3, 50, 8, 20)
    kept = scores.topk(20, dim=1).indices.sort(dim=1).values  # [B, k]
    want = reference.recycle(hidden, scores, list(kept), [50] * 3)
    for impl in (cpu, fused):
        slots, states = impl.recycle(hidden, scores, kept, [50] * 3)
        assert slots.shape == (3, 20 + reference.recycled_count(30)) and states.shape == (*slots.shape, 8)
        assert_same_recycling((slots, states), want, list(kept), centre_ties=impl is fused)


def test_without_merging_only_the_kept_tokens_come_back(interpret):
    hidden, scores, kept, counts = recycle_case(2, 40, 6, 10)
    for impl in (reference, cpu, fused):
        slots, states = impl.recycle(hidden, scores, kept, counts, merge=False)
        for b in range(2):
            assert torch.equal(slots[b], kept[b]) and torch.equal(states[b], hidden[b, kept[b]])


def test_a_full_budget_recycles_the_one_token_left_scaled_as_the_official_rule_does(interpret):
    """n - 1 kept: the last token is a cluster of one, x / (1 + 1e-6) in float32."""
    hidden, scores, _, _ = recycle_case(1, 12, 5, 11)
    kept = [torch.arange(1, 12)]
    scale = 1.0 / (torch.ones(1) + 1e-6)
    for impl in (reference, cpu, fused):
        slots, states = impl.recycle(hidden, scores, kept, [12])
        assert torch.equal(slots[0], torch.arange(12))
        torch.testing.assert_close(states[0][0], hidden[0, 0] * scale, atol=0, rtol=1e-7)


def test_recycling_differs_from_dropping():
    """The check can fail: a wrong merge (here: none) is caught by the comparison."""
    hidden, scores, kept, counts = recycle_case(1, 63, 17, 20)
    want = reference.recycle(hidden, scores, kept, counts)
    dropped = reference.recycle(hidden, scores, kept, counts, merge=False)
    assert want[0][0].numel() > dropped[0][0].numel()
    with pytest.raises(AssertionError):
        assert_same_recycling((want[0], [hidden[0, want[0][0]]]), want, kept)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_triton_cuda_matches_reference(monkeypatch, nan_poison):
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    hidden, scores, kept, counts = recycle_case(4, 576, 4096, 144, torch.float16)
    want = reference.recycle(hidden, scores, kept, counts)
    got = sparsevlm.recycle(hidden.cuda(), scores.cuda(), [k.cuda() for k in kept], counts)
    assert_same_recycling(([s.cpu() for s in got[0]], [s.cpu() for s in got[1]]), want, kept, torch.float16, True)
    embeds, visual, text = rater_case(3, 700, 4096)
    assert torch.equal(sparsevlm.text_raters(embeds.cuda(), visual.cuda(), text.cuda()).cpu(),
                       reference.text_raters(embeds, visual, text))


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.randn(5, 4), torch.rand(5, 1), [torch.tensor([0])], [5]), r"\[B, N, D\]"),
        ((torch.randn(1, 5, 4), torch.rand(1, 4), [torch.tensor([0])], [5]), r"scores must be \[B, N\] = \(1, 5\)"),
        ((torch.randn(1, 5, 4), torch.rand(1, 5), [torch.tensor([0])], [6]), r"counts\[0\]=6 is outside \[0, N=5\]"),
        ((torch.randn(1, 5, 4), torch.rand(1, 5), [torch.arange(4)], [3]), "keeps 4 of its 3"),
        ((torch.randn(2, 5, 4), torch.rand(2, 5), [torch.arange(2)], [5, 5]), "one entry per sample"),
    ],
)
def test_bad_recycle_inputs_are_named(args, message):
    for impl in (reference, cpu, fused):
        with pytest.raises(ValueError, match=message):
            impl.recycle(*args)


def test_bad_rater_inputs_are_named():
    embeds, visual, text = rater_case(1, 9, 5)
    for impl in (reference, cpu, fused):
        with pytest.raises(ValueError, match=r"text must be \[B, L\] = \(1, 9\) bool"):
            impl.text_raters(embeds, visual, text.long())
        with pytest.raises(ValueError, match=r"float \[B, L, D\]"):
            impl.text_raters(embeds[0], visual, text)


# rater_scores: (B, H, Hkv, T, L, d), odd sizes, GQA and one key head per query head.
SCORE_SHAPES = [(1, 2, 2, 1, 1, 4), (2, 4, 2, 7, 63, 16), (3, 3, 1, 5, 577, 8)]


@pytest.mark.parametrize("shape", SCORE_SHAPES, ids=str)
@pytest.mark.parametrize("masked", [False, True])
def test_rater_scores_cpu_path_is_the_score_kernels_numbers(shape, masked):
    """The CPU path equals the shared score kernel's CPU path bit for bit (same ops, the causal
    mask from a table) and the plain-torch reference within float32 rounding."""
    from pruneware.kernels.scores import cpu as scores_cpu

    b, h, hkv, t, length, d = shape
    gen = torch.Generator().manual_seed(length + t)
    q, k = torch.randn(b, h, t, d, generator=gen), torch.randn(b, hkv, length, d, generator=gen)
    raters = torch.rand(b, t, generator=gen) > 0.4
    raters[:, -1] = True  # a rater in every sample
    key_mask = None
    if masked:
        key_mask = torch.ones(b, length, dtype=torch.bool)
        key_mask[-1, : length // 3] = False  # a left-padded sample (its rows are real)
    run = slice(length - t, length)
    slots = torch.arange(length - t, length).expand(b, -1)
    got = cpu.rater_scores(q, k, raters, run, key_mask, None)
    want, _ = scores_cpu.attention_scores(q, k, raters.float(), query_positions=slots, key_mask=key_mask,
                                          check_positions=False, live_rows=True)
    assert torch.equal(got, want)
    torch.testing.assert_close(got, reference.rater_scores(q, k, raters, run, key_mask, None), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sparsevlm.rater_scores(q, k, raters, run, key_mask, 0.3),
                               reference.rater_scores(q, k, raters, run, key_mask, 0.3), atol=1e-5, rtol=1e-5)
    if t > 1:  # the check can fail: without the causal mask, earlier rows would see later keys
        seeing_all, _ = scores_cpu.attention_scores(q, k, raters.float(), key_mask=key_mask, live_rows=True)
        assert not torch.allclose(seeing_all, got)


def test_rater_scores_name_a_run_that_is_not_the_rows():
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 9, 4)
    with pytest.raises(ValueError, match="run must be the rows' slots 6..8"):
        cpu.rater_scores(q, k, torch.ones(1, 3, dtype=torch.bool), slice(5, 8), None, None)
