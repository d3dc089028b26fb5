"""Where a padded sample's first real token is, read on the host with the layout (LLaVA): DART's
keys are rotated back by it only when some sample is padded, and by the same amount as before.

The layout reads the ids and the attention mask in its one host sync (`VisualLayout.first_real`);
`first_real_shift` then needs no device op at all for an unpadded batch (zero shift: no rotation)
and no argmax for a padded one. After a `pre` stage the language model's input is not the model's,
so the device path stays.
"""

from __future__ import annotations

import pytest
import torch

import pruneware
from pruneware.engine import key_positions
from tests.tiny import llava_inputs, tiny_llava


@pytest.fixture(scope="module")
def model():
    return tiny_llava(layers=4)


def layout_of(model, inputs, **extra):
    run = pruneware.prune(model, "random@2:0.5")
    with run:
        return run.adapter.layout(inputs["input_ids"], {**inputs, **extra})


def test_the_layout_reads_each_samples_first_real_column(model):
    padded = llava_inputs(model, [(4, 1, 5), (1, 1, 2)])
    first = padded["attention_mask"].long().argmax(dim=1).tolist()
    assert first[1] > 0  # the check can fail: the second prompt is left-padded
    assert layout_of(model, padded).first_real == first
    alone = llava_inputs(model, [(4, 1, 5)])
    assert layout_of(model, alone).first_real == [0]
    no_mask = {k: v for k, v in alone.items() if k != "attention_mask"}
    assert layout_of(model, no_mask).first_real is None


@pytest.mark.parametrize(("rows", "plan", "rotated"), [
    ([(4, 1, 5)], "dart@2:0.5", None),  # unpadded: no rotation
    ([(4, 1, 5), (1, 1, 2)], "dart@2:0.5", "host"),  # padded: the host's columns
    ([(4, 1, 5), (1, 1, 2)], "random@pre:0.5,dart@2:0.5", "device"),  # after a pre stage: the device path
])
def test_keys_are_rotated_by_the_host_known_shift(model, monkeypatch, rows, plan, rotated):
    seen = []
    real = key_positions.keys_as_alone

    def record(key, shift, rotary):
        seen.append(None if shift is None else shift.tolist())
        return real(key, shift, rotary)

    monkeypatch.setattr("pruneware.engine.stage_inputs.keys_as_alone", record)
    inputs = llava_inputs(model, rows)
    with pruneware.prune(model, plan), torch.no_grad():
        model(**inputs)
    first = inputs["attention_mask"].long().argmax(dim=1).tolist()
    assert len(seen) == 1
    if rotated is None:
        assert seen == [None]
    elif rotated == "host":
        assert seen == [first]
    else:
        assert seen[0] is not None
