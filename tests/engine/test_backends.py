"""The flash-attention mask path (2-D padding masks, no 4-D mask) and beam search.

flash_attention_2 needs a GPU, so this registers a CPU stand-in with the same contract: the
mask function is transformers' own `flash_attention_mask` (a 2-D padding mask or None), and
the attention aligns causality bottom-right and skips padded keys, as FA2 does when it unpads.
Its name contains "flash", so transformers and pruneware treat it as a flash backend.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

import pruneware
from tests.reference import pad_batch, uncached_greedy
from tests.engine.test_equivalence import logits, make

NAME = "cpu_flash_attention_2"


def cpu_flash_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, H, q, d]; key/value [B, Hkv, k, d]; attention_mask [B, k] (1 = real) or None."""
    b, h, q_len, _ = query.shape
    k_len = key.shape[2]
    groups = h // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    rows = torch.arange(q_len)[:, None] + (k_len - q_len)
    allowed = (torch.arange(k_len)[None, :] <= rows)[None, None].expand(b, 1, q_len, k_len)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    empty = ~allowed.any(-1, keepdim=True)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed | empty, scale=scaling)
    out = out.masked_fill(empty, 0.0)
    return out.transpose(1, 2).contiguous(), None


@pytest.fixture(autouse=True, scope="module")
def cpu_flash():
    AttentionInterface.register(NAME, cpu_flash_attention)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    yield
    AttentionInterface._global_mapping.pop(NAME, None)
    AttentionMaskInterface._global_mapping.pop(NAME, None)


def flash_model(family: str):
    model, inputs, samples = make(family)
    model.set_attn_implementation({"text_config": NAME})
    return model, inputs, samples


@pytest.mark.parametrize("family", ["llava", "qwen"])
@pytest.mark.parametrize("plan", ["divprune@pre:0.3", "fastv@2:0.3", "adaptinfer@1:0.5,random@4:0.2"])
def test_flash_backend_padded_batch_and_generation(family, plan):
    model, _, samples = flash_model(family)
    batch = pad_batch(samples)
    with pruneware.prune(model, plan, seed=1) as run:
        batched = logits(model, batch)
        assert model.config.get_text_config()._attn_implementation.endswith(NAME) or "fastv" not in plan
        for b, sample in enumerate(samples):
            alone = logits(model, sample)
            torch.testing.assert_close(batched[b, -alone.shape[1]:], alone[0], atol=2e-5, rtol=1e-4)
        flash = model.generate(**batch, max_new_tokens=4, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
    assert model.config.get_text_config()._attn_implementation == NAME
    assert run.report.stages[-1].n_after[0] < run.report.stages[0].n_before[0]
    model.set_attn_implementation({"text_config": "sdpa"})
    with pruneware.prune(model, plan, seed=1):
        sdpa = model.generate(**batch, max_new_tokens=4, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
    assert torch.equal(flash.sequences, sdpa.sequences)
    torch.testing.assert_close(torch.stack(flash.logits, 1), torch.stack(sdpa.logits, 1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_flash_backend_cached_generate_equals_uncached(family):
    model, inputs, _ = flash_model(family)
    with pruneware.prune(model, "divprune@pre:0.4,random@3:0.5", seed=5):
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        ids, uncached = uncached_greedy(model, inputs, 4)
    assert torch.equal(out.sequences, ids)
    torch.testing.assert_close(torch.stack(out.logits, 1), uncached, atol=1e-4, rtol=1e-4)


def test_flash_backend_keep_all_is_bit_identical():
    model, inputs, _ = flash_model("llava")
    expected = logits(model, inputs)
    with pruneware.prune(model, "fastv@2:1.0"):
        assert torch.equal(logits(model, inputs), expected)


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_beam_search_equals_samples_alone(family):
    model, _, samples = make(family)
    batch = pad_batch(samples[:2])
    with pruneware.prune(model, "divprune@pre:0.4,random@3:0.5", seed=0):
        beams = model.generate(**batch, max_new_tokens=4, num_beams=3, do_sample=False)
        for b, sample in enumerate(samples[:2]):
            alone = model.generate(**sample, max_new_tokens=4, num_beams=3, do_sample=False)
            assert torch.equal(beams[b, -4:], alone[0, -4:])


def test_an_unregistered_backend_is_named_not_replaced_by_eager():
    model, inputs, _ = make("llava")
    text = model.config.get_text_config()
    text._attn_implementation = "my_backend"  # what a backend the user forgot to register looks like
    try:
        hooks = sum(len(m._forward_pre_hooks) for m in model.modules())
        with pytest.raises(ValueError, match=r"cannot wrap the attention backend 'my_backend'.*registered: eager, .*sdpa"):
            pruneware.prune(model, "fastv@2:0.5").attach()
        assert sum(len(m._forward_pre_hooks) for m in model.modules()) == hooks
    finally:
        text._attn_implementation = "sdpa"
