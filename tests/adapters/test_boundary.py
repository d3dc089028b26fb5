"""What belongs to a model family goes through the adapter: RoPE tables, the groups of layers
that share a mask (per-layer attention types), and the inputs merged positions need."""

from __future__ import annotations

import pytest
import torch

import pruneware
from tests.tiny import llava_inputs, tiny_llava


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_layers_of_different_groups_get_their_own_mask_and_rope_and_the_same_result():
    model = tiny_llava(layers=6)
    inputs = llava_inputs(model, [(3, 1, 4)])
    with pruneware.prune(model, "random@2:0.5:compact", seed=1):
        expected = _logits(model, inputs)
    session = pruneware.prune(model, "random@2:0.5:compact", seed=1)
    rope_calls = []
    original = session.adapter.rope_tables
    session.adapter.layer_group = lambda layer: "sliding" if layer % 2 else "full"
    session.adapter.rope_tables = lambda like, positions: rope_calls.append(1) or original(like, positions)
    levels = []
    with session:
        handle = model.model.language_model.layers[5].register_forward_pre_hook(
            lambda m, a: levels.append(session._requests.current.levels[-1])
        )
        try:
            got = _logits(model, inputs)
        finally:
            handle.remove()
    assert torch.equal(got, expected)
    assert {k for k in levels[0].cache} == {("kwargs", "full"), ("kwargs", "sliding")}
    assert len(rope_calls) == 2  # once per group, through the adapter
    assert levels[0].stage is not None and levels[0].stage.positions == "compact"


def test_a_missing_capture_names_the_layer():
    model = tiny_llava(layers=6)
    inputs = llava_inputs(model, [(3, 1, 4)])
    session = pruneware.prune(model, "fastv@3:0.5")
    session._on_attention = lambda *args: None  # as if layer 2's attention bypassed the capture
    with session, pytest.raises(pruneware.PlanError, match=r"fastv@3:0.5: no attention rows were captured at layer 2"):
        _logits(model, inputs)
