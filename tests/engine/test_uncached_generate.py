"""`generate(use_cache=False)` under every registered policy and on every family (issue 33, row 2).

transformers encodes the pixels once per `generate` (`mm_encoder_outputs`) and, without a cache,
runs a full forward per new token on those features: no vision-tower call precedes the later
forwards, which used to lose Qwen's grids and the tower reads of `fastervlm` / `visionzip`. The
session now files what the tower gave under the features object (`RequestTracker.replay_encoding`).

Uncached equals cached generation for a policy whose choice does not read the text. One that
ranks by the text's attention re-chooses at every uncached step, on query rows that now include
the generated tokens (a different function, see test_every_policy.py (d)): there the first step,
the same prefill, is equal, and the rest must run.
"""

from __future__ import annotations

import pytest
import torch

import pruneware
from pruneware.policies import available
from tests.adapters.test_families import make
from tests.policies.test_every_policy import CASES, model_for, one_sample, plan
from tests.reference import pad_batch
from tests.tiny import IMAGE_TOKEN, VIDEO_TOKEN

STEPS = 2
KW = dict(max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True)


def both(model, inputs: dict):
    """(cached, uncached) generate outputs: sequences [B, L + STEPS] and logits [B, STEPS, V].

    A random model may generate an image or video token, which the next uncached forward would
    count as media without features (plain transformers fails there too): those logits are masked."""
    media = torch.tensor([IMAGE_TOKEN, VIDEO_TOKEN])
    handle = model.lm_head.register_forward_hook(lambda _m, _a, out: out.index_fill(-1, media, float("-inf")))
    out = []
    try:
        for use_cache in (True, False):
            result = model.generate(**inputs, **KW, use_cache=use_cache)
            out.append((result.sequences, torch.stack(result.logits, 1)))
    finally:
        handle.remove()
    return out


@pytest.mark.parametrize(("name", "where"), CASES, ids=[f"{n}@{w}" for n, w in CASES])
@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_uncached_generate_runs_every_policy(name, where, family):
    model = model_for(family)
    inputs = one_sample(model, family)
    with pruneware.prune(model, plan(name, where), seed=4) as run:
        (ids, logits), (ids_uncached, logits_uncached) = both(model, inputs)
        assert run.report.stages[0].n_after[0] < run.report.stages[0].n_before[0]
    needs = available()[name].needs
    if needs.attention is not None or needs.text or needs.raters:  # re-chooses at every uncached step
        torch.testing.assert_close(logits_uncached[:, 0], logits[:, 0], atol=1e-5, rtol=1e-5)
        assert ids_uncached.shape == ids.shape
        return
    assert torch.equal(ids_uncached, ids)
    torch.testing.assert_close(logits_uncached, logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("plan_text", ["random@pre:0.5", "random@3:0.5"])
@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "qwen3_vl"])
def test_uncached_generate_equals_cached_on_every_family(family, plan_text):
    model, _, samples = make(family)
    batch = pad_batch(samples)
    with pruneware.prune(model, plan_text, seed=4):
        (ids, logits), (ids_uncached, logits_uncached) = both(model, batch)
    assert torch.equal(ids_uncached, ids)
    torch.testing.assert_close(logits_uncached, logits, atol=1e-5, rtol=1e-5)
