"""attention_scores with per-head weights [B, H, T] and the per-head query block [B, H, T, T].

AdaptInfer's official score is sum_h prior_h . A_h[text, image] with a prior per head, so the
kernel takes one weight per (head, row) and can return the text-to-text block per head. The
truth here is a float64 loop over heads and rows; the reference and the interpreted Triton
kernel must both match it, on GQA, padding, causal rows and odd sizes.
"""

from __future__ import annotations

import pytest
import torch

import pruneware.kernels.scores as scores
from pruneware.kernels import dispatch
from pruneware.kernels.scores import reference
from pruneware.kernels.scores import triton as fused

CASES = [  # B, Hkv, group, T, L, d, dtype
    (2, 2, 2, 7, 63, 16, torch.float32),
    (1, 1, 4, 33, 577, 32, torch.float32),
    (2, 3, 1, 1, 65, 8, torch.bfloat16),
]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=1e-3, atol=1e-4)}


def make(B, Hkv, group, T, L, d, dtype, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    H = Hkv * group
    q = (2 * torch.randn(B, T, H, d, generator=g)).to(dtype).transpose(1, 2)  # [B, H, T, d]
    k = torch.randn(B, L, Hkv, d, generator=g).to(dtype).transpose(1, 2)  # [B, Hkv, L, d]
    weights = torch.rand(B, H, T, generator=g)
    key_mask = torch.ones(B, L, dtype=torch.bool)
    key_mask[1:, : L // 5] = False  # left padding on the later samples
    positions = torch.stack([torch.randint(L // 4, L, (T,), generator=g).sort().values for _ in range(B)])
    positions[:, -1] = L - 1
    return dict(q=q, k=k, weights=weights, query_positions=positions, key_mask=key_mask)


def naive(q, k, weights, query_positions, key_mask):
    """float64, one head and row at a time: s [B, L] and the per-head block [B, H, T, T]."""
    B, H, T, d = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    s = torch.zeros(B, L, dtype=torch.float64)
    qq = torch.zeros(B, H, T, T, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            logits = q[b, h].double() @ k[b, h // (H // Hkv)].double().T * d**-0.5  # [T, L]
            for t in range(T):
                allowed = key_mask[b] & (torch.arange(L) <= query_positions[b, t])
                p = torch.zeros(L, dtype=torch.float64)
                p[allowed] = torch.softmax(logits[t, allowed], dim=0)
                s[b] += weights[b, h, t].double() * p
                qq[b, h, t] = p[query_positions[b]]
    return s, qq


@pytest.mark.parametrize("case", CASES[:2], ids=str)
def test_reference_per_head_weights_and_block_match_naive(case):
    inputs = make(*case)
    s, qq = reference.attention_scores(**inputs, return_query_block=True, per_head_block=True)
    want_s, want_qq = naive(**inputs)
    torch.testing.assert_close(s, want_s.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(qq, want_qq.float(), rtol=1e-5, atol=1e-6)
    # The summed block is the per-head block summed over heads.
    _, summed = reference.attention_scores(**inputs, return_query_block=True)
    torch.testing.assert_close(summed, qq.sum(1), rtol=1e-5, atol=1e-6)


def test_row_weights_equal_per_head_weights_repeated():
    inputs = make(*CASES[0])
    row = inputs["weights"][:, 0]
    per_row, _ = reference.attention_scores(**{**inputs, "weights": row})
    per_head, _ = reference.attention_scores(**{**inputs, "weights": row[:, None].expand_as(inputs["weights"])})
    torch.testing.assert_close(per_row, per_head)
    assert not torch.allclose(per_head, reference.attention_scores(**inputs)[0])  # heads do differ


@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_per_head_matches_reference(case, monkeypatch, nan_poison):
    if not fused._INTERPRETED:
        pytest.skip("the CUDA run of this file covers the compiled kernel")
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    inputs = make(*case)
    for per_head in (False, True):
        s, qq = scores.attention_scores(**inputs, return_query_block=True, per_head_block=per_head)
        ref_s, ref_qq = reference.attention_scores(**inputs, return_query_block=True, per_head_block=per_head)
        assert not s.isnan().any() and not qq.isnan().any(), "unwritten outputs"
        torch.testing.assert_close(s, ref_s, **TOL[case[-1]])
        torch.testing.assert_close(qq, ref_qq, **TOL[case[-1]])
    row_weights = inputs["weights"][:, 0]  # [B, T] still works through the head stride 0
    s, _ = scores.attention_scores(**{**inputs, "weights": row_weights})
    ref_s, _ = reference.attention_scores(**{**inputs, "weights": row_weights})
    torch.testing.assert_close(s, ref_s, **TOL[case[-1]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_cuda_per_head_matches_reference(case, monkeypatch):
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    inputs = {n: t.cuda() for n, t in make(*case).items()}
    s, qq = scores.attention_scores(**inputs, return_query_block=True, per_head_block=True)
    ref_s, ref_qq = reference.attention_scores(**inputs, return_query_block=True, per_head_block=True)
    torch.testing.assert_close(s, ref_s, **TOL[case[-1]])
    torch.testing.assert_close(qq, ref_qq, **TOL[case[-1]])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_per_head_shapes_are_named(backend, monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, backend)
    q, k = torch.ones(2, 4, 3, 16), torch.ones(2, 2, 9, 16)
    with pytest.raises(ValueError, match=r"\[B, T\] = \[2, 3\] or \[B, H, T\] = \[2, 4, 3\], got .* \[2, 2, 3\]"):
        scores.attention_scores(q, k, torch.ones(2, 2, 3))
    with pytest.raises(ValueError, match=r"per_head_block=True only shapes the block of return_query_block"):
        scores.attention_scores(q, k, torch.ones(2, 3), per_head_block=True)
