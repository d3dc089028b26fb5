"""attention_scores: reference vs a naive softmax, Triton vs reference, errors, dispatch.

The Triton kernel runs on CPU under ``TRITON_INTERPRET=1`` and on CUDA when
one is present. Triton 3.8 reads that flag once, when triton is first
imported (torch and transformers import it early), so ``tests/conftest.py``
sets it on machines without CUDA; with CUDA the interpreted tests skip and the
CUDA tests run the compiled kernel instead.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch

import pruneware.kernels.scores as scores
from pruneware.kernels import dispatch
from pruneware.kernels.scores import reference
from pruneware.kernels.scores import triton as fused

CUDA = torch.cuda.is_available()
TOL = {  # the reference computes in fp32 from the same (rounded) inputs
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-4),
    torch.bfloat16: dict(rtol=1e-3, atol=1e-4),
}


@dataclass(frozen=True)
class Case:
    B: int
    Hkv: int
    group: int  # query heads per key head (GQA ratio)
    T: int
    L: int
    d: int
    dtype: torch.dtype = torch.float32
    causal: bool = True
    pad: bool = True  # left padding on every other sample
    query_block: bool = False

    def __str__(self) -> str:
        flags = "".join(f for f, on in (("c", self.causal), ("p", self.pad), ("q", self.query_block)) if on)
        dt = str(self.dtype).removeprefix("torch.")
        return f"B{self.B}-Hkv{self.Hkv}x{self.group}-T{self.T}-L{self.L}-d{self.d}-{dt}-{flags}"


# Each T, L, GQA ratio, dtype and mask option appears at least once, not the
# whole cross product: the interpreter is slow.
KERNEL_CASES = [
    Case(2, 2, 1, 1, 577, 64),  # FastV: one row, the last text token
    Case(2, 1, 4, 7, 63, 32, torch.bfloat16, query_block=True),
    Case(1, 1, 7, 33, 1031, 128, query_block=True),
    Case(2, 2, 1, 33, 63, 80, torch.bfloat16, causal=False),  # d not a power of 2
    Case(2, 1, 7, 7, 577, 96, torch.bfloat16, query_block=True),
    Case(1, 2, 4, 1, 1031, 256, torch.float16, causal=False),
    Case(2, 1, 4, 33, 577, 8, pad=False, query_block=True),
    Case(2, 3, 1, 7, 1031, 64, torch.bfloat16, causal=False, pad=False),
    Case(1, 1, 1, 7, 63, 16, query_block=True),
    Case(2, 2, 7, 33, 577, 64, torch.bfloat16, query_block=True),
    Case(1, 4, 4, 7, 63, 128, torch.float16, query_block=True),
    Case(1, 1, 80, 1, 63, 16),  # more heads per group than one program's rows
]
NAIVE_CASES = [
    Case(2, 1, 1, 1, 63, 16),
    Case(2, 2, 4, 7, 63, 32, query_block=True),
    Case(2, 1, 7, 7, 63, 8, causal=False),
    Case(2, 1, 1, 5, 40, 16, torch.bfloat16, pad=False, query_block=True),
]


def make_inputs(case: Case, device: str = "cpu") -> dict:
    """Random inputs laid out like HF attention (non-contiguous q and k)."""
    gen = torch.Generator().manual_seed(zlib.crc32(str(case).encode()))
    B, T, L, H = case.B, case.T, case.L, case.Hkv * case.group
    q = (2 * torch.randn(B, T, H, case.d, generator=gen)).to(case.dtype).transpose(1, 2)
    k = torch.randn(B, L, case.Hkv, case.d, generator=gen).to(case.dtype).transpose(1, 2)
    weights = torch.rand(B, T, generator=gen)
    if T > 2:
        weights[:, 1] = 0.0  # an ignored row
    pads = [min(L // 3, 11) * (b % 2) if case.pad else 0 for b in range(B)]
    key_mask = torch.ones(B, L, dtype=torch.bool)
    for b, p in enumerate(pads):
        key_mask[b, :p] = False
    positions = None
    if case.causal or case.query_block:
        rows = []
        for b in range(B):
            pos = torch.randint(0, L, (T,), generator=gen).sort().values
            pos[-1] = L - 1  # the last text token sees every key
            rows.append(pos)
        positions = torch.stack(rows)
        if case.causal and case.pad and B > 1 and T > 1:
            positions[1, 0] = 0  # inside the padding: no allowed key at all
    out = dict(q=q, k=k, weights=weights, query_positions=positions, key_mask=key_mask if case.pad else None)
    if not case.causal and case.query_block:
        raise ValueError("query_block cases must be causal here")
    return {n: (t.to(device) if t is not None else None) for n, t in out.items()}


def naive(q, k, weights, query_positions, key_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """One row at a time in float64: softmax over the allowed keys only."""
    B, H, T, d = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    s = torch.zeros(B, L, dtype=torch.float64)
    qq = torch.zeros(B, T, T, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            logits = k[b, h // (H // Hkv)].double() @ q[b, h].double().T * d**-0.5  # [L, T]
            for t in range(T):
                allowed = torch.ones(L, dtype=torch.bool)
                if key_mask is not None:
                    allowed &= key_mask[b]
                if query_positions is not None:
                    allowed &= torch.arange(L) <= query_positions[b, t]
                if not allowed.any():
                    continue
                p = torch.zeros(L, dtype=torch.float64)
                p[allowed] = torch.softmax(logits[allowed, t], dim=0)
                s[b] += weights[b, t].double() * p
                if query_positions is not None:
                    qq[b, t] += p[query_positions[b]]
    return s, qq


def check_against_reference(case: Case, device: str) -> None:
    inputs = make_inputs(case, device)
    s, qq = scores.attention_scores(**inputs, return_query_block=case.query_block)
    ref_s, ref_qq = reference.attention_scores(**inputs, return_query_block=case.query_block)
    assert s.dtype == torch.float32 and s.shape == (case.B, case.L)
    assert not s.isnan().any(), "unwritten or NaN scores"
    torch.testing.assert_close(s, ref_s, **TOL[case.dtype])
    if case.query_block:
        assert qq is not None and qq.shape == (case.B, case.T, case.T)
        assert not qq.isnan().any(), "unwritten or NaN query block"
        torch.testing.assert_close(qq, ref_qq, **TOL[case.dtype])
    else:
        assert qq is None


DEVICE = "cuda" if CUDA else "cpu"


@pytest.mark.parametrize("case", NAIVE_CASES, ids=str)
def test_reference_matches_naive_softmax(case: Case) -> None:
    inputs = make_inputs(case)
    s, qq = reference.attention_scores(**inputs, return_query_block=case.query_block)
    want_s, want_qq = naive(**inputs)
    torch.testing.assert_close(s, want_s.float(), rtol=1e-5, atol=1e-6)
    if case.query_block:
        torch.testing.assert_close(qq, want_qq.float(), rtol=1e-5, atol=1e-6)


def test_reference_empty_rows_give_zero_and_mass_is_conserved() -> None:
    inputs = make_inputs(Case(2, 1, 4, 7, 63, 16))
    assert int(inputs["query_positions"][1, 0]) < 11  # row 0 of sample 1 sees only padding
    s, _ = reference.attention_scores(**inputs)
    live = torch.ones(2, 7)
    live[1, 0] = 0.0
    # Each live row's probabilities sum to 1 in each of the 4 heads.
    torch.testing.assert_close(s.sum(-1), 4 * (inputs["weights"] * live).sum(-1))
    assert (s[1, :11] == 0).all()  # padded keys


@pytest.mark.parametrize("case", KERNEL_CASES, ids=str)
def test_triton_interpreted_matches_reference(case: Case, interpret, nan_poison) -> None:
    check_against_reference(case, "cpu")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("case", KERNEL_CASES, ids=str)
def test_triton_cuda_matches_reference(case: Case, monkeypatch, nan_poison) -> None:
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    assert dispatch.choose_backend(torch.ones(1, device="cuda")) == "triton"
    check_against_reference(case, "cuda")


def test_triton_custom_scale_and_zero_rows(interpret, nan_poison) -> None:
    inputs = make_inputs(Case(1, 1, 4, 7, 63, 32, query_block=True))
    s, qq = scores.attention_scores(**inputs, scale=0.3, return_query_block=True)
    ref_s, ref_qq = reference.attention_scores(**inputs, scale=0.3, return_query_block=True)
    torch.testing.assert_close(s, ref_s, **TOL[torch.float32])
    torch.testing.assert_close(qq, ref_qq, **TOL[torch.float32])
    inputs["weights"] = torch.zeros_like(inputs["weights"])
    s, _ = scores.attention_scores(**inputs)
    assert (s == 0).all()


BAD_INPUTS = [
    (dict(q=torch.ones(2, 4, 3)), r"q must be 4-D \[B, H, T, d\], got shape \[2, 4, 3\]"),
    (dict(k=torch.ones(2, 2, 63, 8)), r"k must be \[B, Hkv, L, d\] = \[2, Hkv, L, 16\]"),
    (dict(k=torch.ones(2, 3, 63, 16)), r"H=4 query heads .* multiple of the Hkv=3"),
    (dict(k=torch.ones(2, 2, 63, 16, dtype=torch.float16)), r"share one floating dtype"),
    (dict(weights=torch.ones(2, 4)), r"weights must be a float tensor \[B, T\] = \[2, 3\]"),
    (dict(weights=torch.ones(2, 3, dtype=torch.long)), r"weights must be a float tensor"),
    (dict(key_mask=torch.ones(2, 63)), r"key_mask must be a bool tensor \[B, L\] = \[2, 63\]"),
    (dict(query_positions=torch.ones(2, 3)), r"query_positions must be an integer tensor"),
    (dict(query_positions=torch.ones(2, 3, dtype=torch.uint8)), r"integer tensor \(int64 or int32\)"),
    (dict(query_positions=torch.full((2, 3), 63)), r"lie in \[0, 62\], got values in \[63, 63\]"),
    (dict(return_query_block=True), r"return_query_block=True needs query_positions"),
    (dict(scale=-1.0), r"scale must be a positive finite number, got -1.0"),
]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("bad,message", BAD_INPUTS, ids=lambda x: x if isinstance(x, str) else None)
def test_bad_inputs_raise_clear_errors(bad, message, backend, monkeypatch) -> None:
    monkeypatch.setenv(dispatch.BACKEND_ENV, backend)
    args = dict(q=torch.ones(2, 4, 3, 16), k=torch.ones(2, 2, 63, 16), weights=torch.ones(2, 3))
    args.update(bad)
    q, k, w = args.pop("q"), args.pop("k"), args.pop("weights")
    with pytest.raises(ValueError, match=message):
        scores.attention_scores(q, k, w, **args)


def test_triton_backend_limits_are_explained(monkeypatch) -> None:
    q, k, w = (torch.ones(1, 2, 3, 16), torch.ones(1, 2, 9, 16), torch.ones(1, 3))
    with monkeypatch.context() as m:
        m.setattr(fused, "_INTERPRETED", False)
        with pytest.raises(ValueError, match=r"needs CUDA tensors, got cpu; .* TRITON_INTERPRET=1"):
            fused.attention_scores(q, k, w)
    q, k, w = q.to(DEVICE), k.to(DEVICE), w.to(DEVICE)
    with pytest.raises(ValueError, match=r"float16, bfloat16 or float32, got torch.float64"):
        fused.attention_scores(q.double(), k.double(), w)
    big_q, big_k = torch.ones(1, 2, 3, 320, device=DEVICE), torch.ones(1, 2, 9, 320, device=DEVICE)
    with pytest.raises(ValueError, match=r"head dim d <= 256, got d=320"):
        fused.attention_scores(big_q, big_k, w)


def test_dispatch_follows_device_and_environment(monkeypatch) -> None:
    cpu = torch.ones(1)
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    assert dispatch.choose_backend(cpu, None) == "reference"
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    assert dispatch.choose_backend(cpu) == "triton"
    monkeypatch.setenv(dispatch.BACKEND_ENV, "Reference")
    assert dispatch.choose_backend(cpu) == "reference"
    monkeypatch.setenv(dispatch.BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match=r"PRUNEWARE_KERNELS='fast' is not a valid .* reference, triton"):
        dispatch.choose_backend(cpu)
    if CUDA:
        monkeypatch.setenv(dispatch.BACKEND_ENV, "reference")
        assert dispatch.choose_backend(torch.ones(1, device="cuda")) == "reference"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_no_query_rows_give_zero_scores(backend, monkeypatch) -> None:
    monkeypatch.setenv(dispatch.BACKEND_ENV, backend)
    q, k, w = torch.ones(1, 2, 0, 16), torch.ones(1, 2, 9, 16), torch.ones(1, 0)
    q, k, w = q.to(DEVICE), k.to(DEVICE), w.to(DEVICE)
    pos = torch.ones(1, 0, dtype=torch.long, device=DEVICE)
    s, qq = scores.attention_scores(q, k, w, query_positions=pos, return_query_block=True)
    assert s.shape == (1, 9) and (s == 0).all() and qq.shape == (1, 0, 0)
