"""`compact` stages give a sample the same positions in a batch as alone (issue 33, row 4).

A compact stage renumbers its level's slots 0..Ls-1. It used to skip that when no sample of the
call dropped a token (the level was the previous one), so a sample that keeps everything was
renumbered in a batch whose other samples drop tokens, and not alone: after a `pre` stage that
leaves gaps in the positions, its logits moved. Now a compact stage always renumbers.
"""

from __future__ import annotations

import pytest
import torch

import pruneware
from tests.reference import pad_batch
from tests.tiny import llava_inputs, tiny_llava

PLANS = [
    "divprune@pre:0.5,random@4:12:compact",  # the first sample keeps everything at layer 4
    "divprune@pre:0.5,random@3:0.9:compact,random@4:12",  # nobody drops at 3, the level is padded
    "random@2:0.9:compact,random@4:12:compact",
]


@pytest.mark.parametrize("plan", PLANS)
def test_a_batch_with_compact_stages_equals_its_samples_alone(plan):
    model = tiny_llava()
    samples = [llava_inputs(model, [(2, 1, 7)], seed=1), llava_inputs(model, [(3, 2, 3)], seed=3)]
    batch = pad_batch(samples)
    kw = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with pruneware.prune(model, plan, seed=2) as run:
        with torch.no_grad():
            batched = model(**batch).logits[:, -1]
        kept = [s.kept for s in run.report.stages]
        generated = model.generate(**batch, **kw)
        for b, sample in enumerate(samples):
            with torch.no_grad():
                alone = model(**sample).logits[0, -1]
            offset = batch["input_ids"].shape[1] - sample["input_ids"].shape[1]
            for stage_kept, stage in zip(kept, run.report.stages, strict=True):
                assert torch.equal(stage_kept[b] - offset, stage.kept[0])
            torch.testing.assert_close(batched[b], alone, atol=2e-6, rtol=1e-5)
            alone_generated = model.generate(**sample, **kw)
            assert torch.equal(generated.sequences[b, -3:], alone_generated.sequences[0, -3:])
            torch.testing.assert_close(
                torch.stack(generated.logits, 1)[b], torch.stack(alone_generated.logits, 1)[0], atol=2e-6, rtol=1e-5
            )

