"""text_prior / text_prior_scores (AdaptInfer's text-prior scoring): the reference vs the policy's
official rule composed with the shared score kernel, and the CPU path and the Triton kernel vs the
reference, on odd sizes, grouped-query heads, padding rows and keys, runs of rows and gathered rows.

The Triton kernel runs on CPU under ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py`` on
machines without CUDA) and compiled on CUDA when one is present.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

import pruneware.kernels.text_prior as text_prior
from pruneware.kernels import dispatch
from pruneware.kernels.scores.reference import attention_scores
from pruneware.kernels.text_prior import cpu, reference
from pruneware.kernels.text_prior import triton as fused  # noqa: F401 (tests/kernels/conftest.py's interpret fixture reads it)

CUDA = torch.cuda.is_available()
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}
# (B, H, Hkv, T, L, d, run): odd sizes, GQA, one row, a run of rows ending at the last key, more than one tile.
SHAPES = [(1, 1, 1, 1, 1, 4, True), (1, 4, 2, 5, 21, 8, True), (2, 4, 4, 7, 33, 8, False),
          (3, 6, 2, 9, 47, 16, False), (2, 2, 1, 70, 97, 16, True)]


def case(B, H, Hkv, T, L, d, run, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed + 13 * T + L)
    q = torch.randn(B, H, T, d, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, L, d, generator=gen).to(dtype)
    if run:
        positions = torch.arange(L - T, L).expand(B, T)
        valid, key_mask, query_run = torch.ones(B, T, dtype=torch.bool), None, slice(L - T, L)
    else:  # left-padded rows: a sample's first rows are padding, their slots padding keys
        positions = torch.sort(torch.randperm(L, generator=gen)[:T]).values.expand(B, T).clone()
        valid = torch.ones(B, T, dtype=torch.bool)
        key_mask = torch.rand(B, L, generator=gen) > 0.25
        valid[1:, :2] = False
        key_mask[1:, : int(positions[1, 1]) + 1] = False
        key_mask.scatter_(1, positions, valid)  # a valid row sees its own slot; a padding row does not
        query_run = None
    return (q, k, positions, valid), dict(key_mask=key_mask, query_run=query_run)


def official_prior(block: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """AdaptInfer's `attn_postprocess_topk_with_t2t_weighting`, per sample: t2t + t2t^T - diag, column sums."""
    out = []
    for b in range(block.shape[0]):
        keep = valid[b]
        t2t = block[b][:, keep][:, :, keep]  # [H, t, t]
        prior = (t2t + t2t.transpose(1, 2) - torch.diag_embed(torch.diagonal(t2t, dim1=1, dim2=2))).sum(dim=1)
        row = torch.zeros(block.shape[1], block.shape[2])
        row[:, keep] = prior
        out.append(row)
    return torch.stack(out)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_is_the_official_prior_composed_with_the_score_kernel(shape):
    (q, k, positions, valid), kw = case(*shape)
    _, block = attention_scores(q, k, torch.zeros(q.shape[0], q.shape[2]), query_positions=positions,
                                key_mask=kw["key_mask"], return_query_block=True, per_head_block=True)
    prior = official_prior(block, valid)
    torch.testing.assert_close(reference.text_prior(block, valid), prior, **TOL[torch.float32])
    want, _ = attention_scores(q, k, prior, query_positions=positions, key_mask=kw["key_mask"])
    torch.testing.assert_close(reference.text_prior_scores(q, k, positions, valid, **kw), want, **TOL[torch.float32])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpu_path_matches_reference(shape):
    args, kw = case(*shape)
    want = reference.text_prior_scores(*args, **kw)
    torch.testing.assert_close(cpu.text_prior_scores(*args, **kw), want, **TOL[torch.float32])
    torch.testing.assert_close(cpu.text_prior_scores(*args, **{**kw, "query_run": None}), want, **TOL[torch.float32])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_interpreted_matches_reference(shape, interpret, nan_poison):
    args, kw = case(*shape)
    got = text_prior.text_prior_scores(*args, **kw)
    assert got.dtype == torch.float32 and got.shape == (shape[0], shape[4])
    torch.testing.assert_close(got, reference.text_prior_scores(*args, **kw), **TOL[torch.float32])
    (q, k, positions, valid), _ = args, kw
    _, block = attention_scores(q, k, torch.zeros(q.shape[0], q.shape[2]), query_positions=positions,
                                key_mask=kw["key_mask"], return_query_block=True, per_head_block=True)
    torch.testing.assert_close(text_prior.text_prior(block, valid), reference.text_prior(block, valid),
                               **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype, interpret, nan_poison):
    args, kw = case(2, 4, 2, 7, 33, 8, False, dtype=dtype)
    want = reference.text_prior_scores(*args, **kw)
    torch.testing.assert_close(text_prior.text_prior_scores(*args, **kw), want, **TOL[dtype])
    torch.testing.assert_close(cpu.text_prior_scores(*args, **kw), want, **TOL[dtype])


def test_the_policy_fused_scores_equal_its_composed_scores():
    """AdaptInfer's fused call gives what the engine's composition of the score kernel and
    `row_weights` gives (the path the policy took before the fusion)."""
    from pruneware.kernels.scores import attention_scores as composed
    from pruneware.policies.adaptinfer import AdaptInferPolicy

    policy = AdaptInferPolicy()
    for shape in SHAPES:
        (q, k, positions, valid), kw = case(*shape)
        want, _ = composed(q, k, partial(policy.row_weights, row_valid=valid), query_positions=positions,
                           key_mask=kw["key_mask"], per_head_block=True)
        got = policy.fused_attention_scores(q, k, valid, positions, kw["key_mask"], None, kw["query_run"])
        torch.testing.assert_close(got, want, **TOL[torch.float32])
    assert AdaptInferPolicy(prior="last").fused_attention_scores(q, k, valid, positions, None, None, None) is None


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("shape", [*SHAPES, (8, 32, 32, 60, 700, 128, True)], ids=str)
def test_triton_cuda_matches_reference(shape, monkeypatch, nan_poison):
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    (q, k, positions, valid), kw = case(*shape)
    cuda = [t.cuda() for t in (q, k, positions, valid)]
    mask = None if kw["key_mask"] is None else kw["key_mask"].cuda()
    got = text_prior.text_prior_scores(*cuda, key_mask=mask, query_run=kw["query_run"])
    want = reference.text_prior_scores(q, k, positions, valid, **kw)
    torch.testing.assert_close(got.cpu(), want, **TOL[torch.float32])


def test_bad_inputs_are_named():
    (q, k, positions, valid), kw = case(1, 4, 2, 5, 21, 8, True)
    for impl in (reference, cpu, fused):
        with pytest.raises(ValueError, match="row_valid must be a bool tensor"):
            impl.text_prior_scores(q, k, positions, valid.float(), **kw)
        with pytest.raises(ValueError, match=r"k must be \[B, Hkv, L, d\]"):
            impl.text_prior_scores(q, k[..., :3], positions, valid, **kw)
    for impl in (reference, fused):
        with pytest.raises(ValueError, match=r"block must be a float tensor \[B, H, T, T\]"):
            impl.text_prior(torch.zeros(1, 2, 3, 4), torch.ones(1, 3, dtype=torch.bool))


@pytest.mark.parametrize("forced, used", [("", "cpu"), ("reference", "reference"), ("triton", "triton")])
def test_dispatch(forced, used, monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, forced)
    calls = []
    for name, module in (("cpu", cpu), ("reference", reference), ("triton", fused)):
        monkeypatch.setattr(module, "text_prior_scores", lambda *a, name=name, **kw: calls.append(name))
    args, kw = case(1, 2, 2, 3, 9, 4, True)
    text_prior.text_prior_scores(*args, **kw)
    assert calls == [used]
