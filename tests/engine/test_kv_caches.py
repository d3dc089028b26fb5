"""Every cache: a static cache (what compiled decoding uses) gives what uncached recomputation
gives, and a cache the engine cannot drive is refused before any layer runs, naming it."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicSlidingWindowLayer

import pruneware
from pruneware.engine.kv_caches import static_length
from tests.reference import pad_batch, uncached_greedy
from tests.tiny import llava_inputs, qwen_inputs, tiny_llava, tiny_qwen


def _batch(family: str, attn: str):
    if family == "llava":
        model = tiny_llava(attn)
        return model, pad_batch([llava_inputs(model, [(3, 1, 4)]), llava_inputs(model, [(6, 1, 2)], seed=1)])
    model = tiny_qwen(attn)
    return model, pad_batch([qwen_inputs(model, [(3, [(8, 12)], 4)]), qwen_inputs(model, [(5, [(8, 8)], 2)], seed=1)])


@pytest.mark.parametrize("family", ["llava", "qwen"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "plan", ["random@pre:0.25", "random@3:0.25", "divprune@pre:0.5,fastv@2:0.5,random@4:0.5", "adaptinfer@1:0.5,adaptinfer@3:4"]
)
def test_static_cache_equals_the_dynamic_cache(family, attn, plan):
    """And uncached recomputation, for plans whose choice does not depend on the newest token
    (fastv and adaptinfer score with the last or all text tokens, which recomputation changes)."""
    model, inputs = _batch(family, attn)
    kw = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with pruneware.prune(model, plan, seed=1) as run:
        out = model.generate(**inputs, cache_implementation="static", **kw)
        assert run.report.stages[-1].n_after[0] < run.report.stages[0].n_before[0]
        dynamic = model.generate(**inputs, **kw)
        ids, uncached = uncached_greedy(model, inputs, 4)
    assert type(out.cache).__name__ == "StaticCache"
    assert torch.equal(out.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(out.logits, 1), torch.stack(dynamic.logits, 1), atol=1e-5, rtol=1e-5)
    if "fastv" not in plan and "adaptinfer" not in plan:
        assert torch.equal(out.sequences, ids)
        torch.testing.assert_close(torch.stack(out.logits, 1), uncached, atol=1e-4, rtol=1e-4)


def test_static_cache_with_compact_positions_on_llava():
    model, inputs = _batch("llava", "sdpa")
    with pruneware.prune(model, "divprune@pre:0.5:compact,random@3:0.5:compact", seed=1):
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, cache_implementation="static")
        dynamic = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, dynamic)


def test_unsupported_cache_is_refused_before_any_layer_runs():
    model, inputs = _batch("llava", "sdpa")
    calls = []
    handle = model.model.language_model.layers[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    sliding = Cache(layers=[DynamicSlidingWindowLayer(sliding_window=8) for _ in range(6)])
    try:
        with pruneware.prune(model, "random@3:0.5"), pytest.raises(
            ValueError, match=r"cannot prune with a Cache whose layers are DynamicSlidingWindowLayer.*"
            r"supported caches: DynamicCache \(the default\) and StaticCache \(cache_implementation='static'\)"
        ):
            name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.24 / older
            model.generate(**inputs, max_new_tokens=2, do_sample=False, **{name: sliding})
    finally:
        handle.remove()
    assert not calls
    offloaded = DynamicCache()
    offloaded.offloading = True  # (building a real one needs a GPU)
    with pytest.raises(ValueError, match="offloaded DynamicCache; supported caches"):
        static_length(offloaded)
    assert static_length(DynamicCache()) is None and static_length(None) is None


def test_compiled_static_decoding_equals_eager():
    """generate() compiles the decode steps of a static cache on a GPU; pruneware's hooks then
    run as graph breaks (dynamo's eager backend here, so the CPU needs no compiler)."""
    from transformers import CompileConfig

    model, inputs = _batch("llava", "sdpa")
    config = CompileConfig(backend="eager", fullgraph=False)
    config._compile_all_devices = True  # what a GPU gets by default
    kw = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True, cache_implementation="static")
    torch._dynamo.reset()
    with pruneware.prune(model, "random@3:0.25", seed=1):
        eager = model.generate(**inputs, **kw)
        compiled = model.generate(**inputs, compile_config=config, **kw)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
    assert torch.equal(compiled.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(compiled.logits, 1), torch.stack(eager.logits, 1), atol=1e-5, rtol=1e-5)
