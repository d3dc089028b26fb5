"""A stage at decoder layer 0 under `generate` (issue 33, row 1).

Such a stage leaves every cache layer the shorter sequence, so the cache length and the mask
the model loop builds from cache layer 0 count the kept slots: the engine folds that level into
level 0 before the first decode step (`RequestState.fold_layer0`). Checked on a left-padded
batch, with a dynamic and a static cache: cached generation equals uncached recomputation per
sample, and each sample of the batch equals itself alone.
"""

from __future__ import annotations

import pytest
import torch

import pruneware
from tests.reference import pad_batch, uncached_greedy
from tests.tiny import IMAGE_TOKEN, llava_inputs, qwen_inputs, tiny_llava, tiny_qwen

STEPS = 3
PLANS = ["random@0:0.5", "divprune@0:8,random@3:0.5", "random@0:0.5:compact,random@2:0.5:compact"]


def never_image_tokens(model):
    """A random model may generate the image token, which a later step would then count as an image
    (uncached recomputation); mask its logit."""
    def hook(_module, _args, output):
        return output.index_fill(-1, torch.tensor([IMAGE_TOKEN]), float("-inf"))
    model.lm_head.register_forward_hook(hook)
    return model


def model_and_samples(family: str):
    if family == "llava":
        model = never_image_tokens(tiny_llava())
        return model, [llava_inputs(model, [(2, 1, 7)], seed=1), llava_inputs(model, [(3, 2, 3)], seed=4)]
    model = never_image_tokens(tiny_qwen())
    return model, [qwen_inputs(model, [(2, [(8, 8)], 6)], seed=1), qwen_inputs(model, [(3, [(4, 8), (8, 8)], 3)], seed=3)]


def generated(model, inputs: dict, cache: str | None):
    kw = dict(max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True)
    out = model.generate(**inputs, **kw, cache_implementation=cache)
    return out.sequences[:, -STEPS:], torch.stack(out.logits, 1)


@pytest.mark.parametrize("cache", [None, "static"])
@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_a_stage_at_layer_zero_generates_as_it_recomputes(family, plan, cache):
    if family == "qwen" and "compact" in plan:
        pytest.skip("compact positions are for 1-D RoPE models")
    model, samples = model_and_samples(family)
    batch = pad_batch(samples)
    with pruneware.prune(model, plan, seed=3) as run:
        ids, logits = generated(model, batch, cache)
        assert run.report.stages[0].where == 0
        assert all(a < b for a, b in zip(run.report.stages[0].n_after, run.report.stages[0].n_before, strict=True))
        for b, sample in enumerate(samples):
            alone_ids, alone_logits = generated(model, sample, cache)
            want_ids, want_logits = uncached_greedy(model, sample, STEPS)
            assert torch.equal(alone_ids, want_ids[:, -STEPS:])
            torch.testing.assert_close(alone_logits, want_logits, atol=1e-4, rtol=1e-4)
            assert torch.equal(ids[b], alone_ids[0])
            torch.testing.assert_close(logits[b], alone_logits[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "qwen3_vl"])
def test_a_stage_at_layer_zero_generates_on_every_family(family):
    """Cached (dynamic and static) and uncached generation agree on a padded batch."""
    from tests.adapters.test_families import make
    from tests.tiny import VIDEO_TOKEN

    model, _, samples = make(family)  # a shared model: the logit mask is removed after
    media = torch.tensor([IMAGE_TOKEN, VIDEO_TOKEN])
    handle = model.lm_head.register_forward_hook(lambda _m, _a, out: out.index_fill(-1, media, float("-inf")))
    batch = pad_batch(samples)
    kw = dict(max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True)
    try:
        with pruneware.prune(model, "divprune@0:0.5", seed=1):
            runs = [model.generate(**batch, **kw), model.generate(**batch, **kw, cache_implementation="static"),
                    model.generate(**batch, **kw, use_cache=False)]
    finally:
        handle.remove()
    for other in runs[1:]:
        assert torch.equal(other.sequences, runs[0].sequences)
        torch.testing.assert_close(torch.stack(other.logits, 1), torch.stack(runs[0].logits, 1), atol=1e-5, rtol=1e-5)
