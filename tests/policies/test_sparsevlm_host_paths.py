"""SparseVLM's host-side shortcuts give what the device paths give, bit for bit: the rater
candidates built from the layout's runs (`stage_inputs.host_post_image`) against `query_rows`, and
the recycled states written in one op (`stage_runner._write_recycled`) against `write_visual`; on one
sample, a left-padded batch (each sample's visual run at its own slot) and two images in a sample."""

from __future__ import annotations

import pytest
import torch

import pruneware
import pruneware.engine.stage_inputs as stage_inputs
import pruneware.engine.stage_runner as stage_runner
import pruneware.policies.sparsevlm as sparsevlm
from pruneware.engine.levels import write_visual
from tests.reference import pad_batch
from tests.tiny import llava_inputs, qwen_inputs, tiny_llava, tiny_qwen

PLAN = "sparsevlm@2:0.5,sparsevlm@3:0.25"


def batches(family: str):
    if family == "llava":
        model = tiny_llava()
        samples = [llava_inputs(model, [(5, 1, 9)], seed=1), llava_inputs(model, [(2, 1, 6)], seed=2),
                   llava_inputs(model, [(3, 2, 5)], seed=3)]
    else:
        model = tiny_qwen()
        samples = [qwen_inputs(model, [(4, [(8, 12)], 9)], seed=1), qwen_inputs(model, [(2, [(8, 12)], 6)], seed=2),
                   qwen_inputs(model, [(3, [(4, 8), (8, 8)], 5)], seed=3)]
    return model, {"one": samples[0], "padded": pad_batch(samples[:2]), "two images": samples[2]}


def run(model, inputs, monkeypatch, host: bool):
    """Logits, kept slots and the raters' inputs of one pruned forward; host=False takes the device paths."""
    seen = []
    real_raters = sparsevlm.text_raters

    def record(embeds, visual, text):
        seen.append((visual.clone(), text.clone()))
        return real_raters(embeds, visual, text)

    with monkeypatch.context() as patch:
        patch.setattr(sparsevlm, "text_raters", record)
        if not host:
            patch.setattr(stage_inputs, "host_post_image", lambda *args: None)
            patch.setattr(stage_runner, "_write_recycled", write_visual)
        with pruneware.prune(model, PLAN) as session, torch.no_grad():
            logits = model(**inputs).logits
    return logits, [s.kept for s in session.report.stages], seen


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_host_paths_equal_the_device_paths(family, monkeypatch):
    model, cases = batches(family)
    used = []
    real_host = stage_inputs.host_post_image
    monkeypatch.setattr(stage_inputs, "host_post_image", lambda *args: used.append(real_host(*args)) or used[-1])
    for name, inputs in cases.items():
        used.clear()
        logits, kept, raters = run(model, inputs, monkeypatch, host=True)
        want_logits, want_kept, want_raters = run(model, inputs, monkeypatch, host=False)
        # One visual run per sample: built on the host; two images with text between: the device path.
        assert used and (used[0] is None) == (name == "two images"), name
        assert len(raters) == len(want_raters) == 1
        for got, want in zip(raters[0], want_raters[0], strict=True):
            assert torch.equal(got, want), name
        assert all(torch.equal(a, b) for stage, want_stage in zip(kept, want_kept, strict=True)
                   for a, b in zip(stage, want_stage, strict=True)), name
        assert torch.equal(logits, want_logits), name
