"""preview_scores (PyramidDrop's layer-K preview): the reference vs a Llama layer's own eager
attention, and the CPU path and the Triton kernel vs the reference, on odd sizes, grouped-query
heads, biases, padding masks, row weights and half precision.

The Triton kernel runs on CPU under ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py`` on
machines without CUDA) and compiled on CUDA when one is present. Every path computes in float32
from the same inputs; the model rounds q and k to its dtype, hence the per-dtype tolerances.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

import pruneware.kernels.preview as preview
from pruneware.kernels import dispatch
from pruneware.kernels.preview import cpu, reference
from pruneware.kernels.preview import triton as fused  # noqa: F401 (tests/kernels/conftest.py's interpret fixture reads it)

CUDA = torch.cuda.is_available()
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
       torch.float16: dict(atol=5e-3, rtol=5e-3)}
# (B, L, D, H, Hkv, d, bias, mask): odd lengths and widths, GQA, one row, biases, padding.
SHAPES = [(1, 1, 8, 1, 1, 2, False, False), (1, 37, 48, 4, 2, 16, False, False), (2, 37, 48, 4, 2, 16, True, True),
          (3, 130, 72, 6, 3, 8, False, True), (2, 65, 200, 4, 4, 34, True, True)]


def case(B, L, D, H, Hkv, d, bias, mask, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed + 7 * L + D)
    rand = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    hidden = rand(B, L, D).to(dtype)
    norm_weight = (1 + rand(D) / 4).to(dtype)
    wq, wk = (rand(H * d, D) / D**0.5).to(dtype), (rand(Hkv * d, D) / D**0.5).to(dtype)
    bq = rand(H * d).to(dtype) if bias else None
    bk = rand(Hkv * d).to(dtype) if bias else None
    angles = torch.arange(L)[:, None] * (0.5 ** torch.arange(d // 2))[None]  # [L, d / 2]
    cos = torch.cat([angles.cos()] * 2, dim=-1)[None].to(dtype)
    sin = torch.cat([angles.sin()] * 2, dim=-1)[None].to(dtype)
    key_mask = weights = None
    if mask:
        key_mask = torch.rand(B, L, generator=gen) > 0.3
        key_mask[:, -1] = True  # the query row is real
        weights = torch.rand(B, 1, generator=gen)
    return (hidden, norm_weight, 1e-6, wq, bq, wk, bk, cos, sin, H, Hkv), dict(key_mask=key_mask, weights=weights)


@pytest.mark.parametrize("gqa", [False, True])
def test_reference_is_the_llama_layers_own_last_row(gqa):
    """The rule: a Llama decoder layer's eager attention weights (input norm, q/k projections,
    RoPE, softmax), the last row summed over heads."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=48, num_attention_heads=4, num_key_value_heads=2 if gqa else 4,
                         intermediate_size=64, rms_norm_eps=1e-5, attention_bias=True)
    config._attn_implementation = "eager"
    layer = LlamaDecoderLayer(config, layer_idx=0).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    hidden = torch.randn(1, 23, 48)
    cos, sin = LlamaRotaryEmbedding(config)(hidden, torch.arange(23)[None])
    with torch.no_grad():
        _, weights = layer.self_attn(layer.input_layernorm(hidden), (cos, sin), None)
    attn = layer.self_attn
    got = reference.preview_scores(hidden, layer.input_layernorm.weight, 1e-5, attn.q_proj.weight, attn.q_proj.bias,
                                   attn.k_proj.weight, attn.k_proj.bias, cos, sin, 4, config.num_key_value_heads,
                                   scale=attn.scaling)
    torch.testing.assert_close(got, weights[:, :, -1].sum(1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpu_path_matches_reference(shape):
    args, kw = case(*shape)
    want = reference.preview_scores(*args, **kw)
    torch.testing.assert_close(cpu.preview_scores(*args, **kw), want, **TOL[torch.float32])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_interpreted_matches_reference(shape, interpret, nan_poison):
    args, kw = case(*shape)
    got = preview.preview_scores(*args, **kw)
    assert got.dtype == torch.float32 and got.shape == shape[:2]
    torch.testing.assert_close(got, reference.preview_scores(*args, **kw), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_against_float32(dtype, interpret, nan_poison):
    """In half precision the kernel computes in float32 from the rounded inputs; the reference
    rounds normed states, q and k to the dtype as the model does: close, per-dtype tolerance."""
    args, kw = case(2, 37, 48, 4, 2, 16, True, True, dtype=dtype)
    torch.testing.assert_close(preview.preview_scores(*args, **kw), reference.preview_scores(*args, **kw), **TOL[dtype])


def test_a_sample_of_padding_only_scores_by_its_weight():
    """Masked keys get exactly 0 beside a real key; a sample with no real key gets 1/L per head,
    times its weight (the engine gives a padding row weight 0)."""
    args, kw = case(2, 9, 16, 2, 1, 4, False, True)
    kw["key_mask"][1] = False
    kw["weights"] = torch.tensor([[1.0], [0.0]])
    for impl in (reference, cpu):
        out = impl.preview_scores(*args, **kw)
        assert torch.all(out[0][~kw["key_mask"][0]] == 0) and torch.all(out[1] == 0)
        torch.testing.assert_close(out[0].sum(), torch.tensor(2.0))


def test_the_cpu_path_follows_weight_updates():
    """The stacked projection is cached per set of weights, and remade when one changes in place."""
    args, kw = case(1, 11, 16, 2, 2, 4, True, False)
    before = cpu.preview_scores(*args, **kw)
    with torch.no_grad():
        args[5].mul_(3.0)  # wk
    want = reference.preview_scores(*args, **kw)
    torch.testing.assert_close(cpu.preview_scores(*args, **kw), want, **TOL[torch.float32])
    assert not torch.allclose(before, cpu.preview_scores(*args, **kw))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("shape", [*SHAPES, (2, 700, 4096, 32, 32, 128, False, True)], ids=str)
def test_triton_cuda_matches_reference(shape, monkeypatch, nan_poison):
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    args, kw = case(*shape)
    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    kw = {k: v.cuda() if v is not None else None for k, v in kw.items()}
    torch.testing.assert_close(preview.preview_scores(*args, **kw), reference.preview_scores(*args, **kw),
                               **TOL[torch.float32])


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(hidden=torch.randn(2, 5)), r"hidden must be a float tensor \[B, L, D\]"),
        (dict(wk=torch.randn(3, 8)), r"wk must be \[Hkv \* d, D\]"),
        (dict(cos=torch.randn(1, 4, 4)), r"cos must be \[B\|1, L, d\]"),
        (dict(heads=3, kv_heads=3), r"wq must be \[H \* d, D\] with H=3"),
        (dict(heads=4, kv_heads=3), "heads=4 must be a positive multiple of kv_heads=3"),
        (dict(key_mask=torch.ones(1, 5)), "key_mask must be a bool tensor"),
        (dict(weights=torch.ones(1)), r"weights must be a float tensor \[B, 1\]"),
    ],
)
def test_bad_inputs_are_named(change, message):
    args, kw = case(1, 5, 8, 2, 2, 4, False, False)
    names = ["hidden", "norm_weight", "eps", "wq", "bq", "wk", "bk", "cos", "sin", "heads", "kv_heads"]
    given = {**dict(zip(names, args, strict=True)), **kw}
    for key, value in change.items():
        given[key] = value
    positional = [given.pop(n) for n in names]
    for impl in (reference, cpu, fused):
        with pytest.raises(ValueError, match=message):
            impl.preview_scores(*positional, **given)


@pytest.mark.parametrize("forced, used", [("", "cpu"), ("reference", "reference"), ("triton", "triton")])
def test_dispatch(forced, used, monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, forced)
    calls = []
    for name, module in (("cpu", cpu), ("reference", reference), ("triton", fused)):
        monkeypatch.setattr(module, "preview_scores", lambda *a, name=name, **kw: calls.append(name))
    args, kw = case(1, 4, 8, 2, 2, 4, False, False)
    preview.preview_scores(*args, **kw)
    assert calls == [used]
