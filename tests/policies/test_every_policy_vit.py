"""Every registered policy that may run in the vision tower (`Needs.vit`), at `vitK` on LLaVA-1.5
(CLIP, 4 layers) and Qwen2.5-VL (4 blocks, full attention at 1 and 3), through the core properties:
keep-all is bit-identical, a left-padded batch equals its samples alone (last-token logits and kept
positions), and no hook is left behind. The cases come from the registry, so a new policy that
declares the place is covered by registering it.
"""

from __future__ import annotations

import pytest
import torch

import pruneware
from pruneware.policies import available
from tests.engine import test_vit_clip as clip
from tests.engine import test_vit_stages as qwen
from tests.tiny import llava_inputs, qwen_inputs

NAMES = sorted(n for n, cls in available().items() if cls.needs.vit)
WHERE = {"llava": "vit2", "qwen": "vit2"}  # after a full-attention block on both (fastervlm reads it)


@pytest.fixture(scope="module", params=["llava", "qwen"])
def family(request):
    model = clip._model() if request.param == "llava" else qwen._model("qwen2.5-vl")
    return request.param, model


def _samples(family: str, model):
    """(batch inputs, [each sample alone])."""
    if family == "llava":
        specs = [(3, 1, 4), (6, 2, 2)]
        return llava_inputs(model, specs), [_llava_alone(model, specs, b) for b in range(2)]
    specs = [(3, [(8, 12)], 4), (7, [(12, 20), (4, 4)], 2)]
    return qwen_inputs(model, specs), [qwen._alone(model, specs, b) for b in range(2)]


def _llava_alone(model, specs, b):
    full = llava_inputs(model, specs)
    real = full["attention_mask"][b].bool()
    first = sum(s[1] for s in specs[:b])
    ids = full["input_ids"][b, real][None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": full["pixel_values"][first : first + specs[b][1]]}


def _run(model, inputs, plan=None):
    with torch.no_grad():
        if plan is None:
            return model(**inputs, use_cache=False).logits, None
        with pruneware.prune(model, plan, seed=3) as run:
            return model(**inputs, use_cache=False).logits, run.report


@pytest.mark.parametrize("name", NAMES)
def test_keep_all_is_bit_identical(family, name):
    kind, model = family
    inputs, _ = _samples(kind, model)
    ref, _ = _run(model, inputs)
    out, _ = _run(model, inputs, f"{name}@{WHERE[kind]}:1.0")
    assert torch.equal(out, ref)


@pytest.mark.parametrize("name", NAMES)
def test_padded_batch_equals_samples_alone_and_nothing_is_left(family, name):
    kind, model = family
    batch, alone = _samples(kind, model)
    plan = f"{name}@{WHERE[kind]}:0.5"
    _run(model, batch)  # transformers adds its own output-recording hooks on a first call
    before = _hooks(model)
    out, report = _run(model, batch, plan)
    pad = (batch["attention_mask"] == 0).sum(dim=1)
    for b, one in enumerate(alone):
        ref, ref_report = _run(model, one, plan)
        torch.testing.assert_close(out[b, -1], ref[0, -1], atol=1e-5, rtol=1e-5)
        assert torch.equal(report.stages[0].kept[b] - pad[b], ref_report.stages[0].kept[0])
    assert _hooks(model) == before


def _hooks(model) -> dict[str, tuple]:
    return {n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for n, m in model.named_modules()}
