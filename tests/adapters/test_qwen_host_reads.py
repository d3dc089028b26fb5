"""The Qwen layout reads input_ids and every grid_thw in one host read, and a vision-side stage's
cut reuses that read of the grid instead of reading it again."""

from __future__ import annotations

import pytest
import torch

import pruneware
from pruneware.engine.profiling import count_host_syncs
from pruneware.errors import PlanError
from tests.tiny import qwen_inputs, tiny_qwen


@pytest.fixture(scope="module")
def model():
    return tiny_qwen()


def engine_syncs(model, inputs: dict, plan: str) -> int:
    with pruneware.prune(model, plan), torch.no_grad():
        model(**inputs)  # warm-up: transformers and the session memoise on the first
        with count_host_syncs() as syncs:
            model(**inputs)
    return syncs["engine"]


@pytest.mark.parametrize("texts", [[(3, [(8, 12)], 4)], [(3, [(8, 12), (4, 4)], 4), (1, [(8, 8)], 2)]])
def test_one_layout_read_for_the_ids_and_every_grid(model, texts):
    """The layout's read (ids and grids) and the report's: the tower's FLOPs reuse the grid's read."""
    assert engine_syncs(model, qwen_inputs(model, texts), "random@pre:0.5") == 2


def test_a_vision_side_cut_does_not_read_the_grid_again(model):
    """The layout's read, the FLOPs' kept counts and the report's: the cut's units reuse the grid's read."""
    assert engine_syncs(model, qwen_inputs(model, [(3, [(8, 12)], 4)]), "random@pre-vit:0.5") == 3


def test_video_tokens_without_their_grid_are_refused_from_the_host_read(model):
    inputs = qwen_inputs(model, [(3, [(8, 8)], 4)])
    inputs["input_ids"][0, 1] = model.config.video_token_id
    refused = pytest.raises((ValueError, PlanError), match="video tokens but no video_grid_thw")
    with pruneware.prune(model, "random@pre:0.5"), refused:
        model(**inputs)


@pytest.mark.parametrize("texts", [[(3, [(8, 12)], 4)], [(3, [(8, 12)], 4), (1, [(8, 8)], 2)]])
@pytest.mark.parametrize("plan", ["resize@pre:0.25", "crosslmm@pre:0.25"])
def test_merged_grids_read_the_grid_once_and_the_kept_types_once(model, texts, plan):
    """The layout's read, the pooled grids' M-RoPE positions (one read for the batch) and the
    report's: the resampling, the spreading back and the tower's FLOPs read no grid (the resized
    one's host copy is kept when it is made)."""
    assert engine_syncs(model, qwen_inputs(model, texts), plan) == 3


@pytest.mark.parametrize("plan", ["visionzip@pre:0.25", "fastervlm@pre:0.25"])
def test_reading_the_tower_asks_no_more_than_the_layout_and_the_report(model, plan):
    """The score layer's per-frame rows and the window order come from the grid's host copy."""
    assert engine_syncs(model, qwen_inputs(model, [(3, [(8, 12)], 4)]), plan) == 2
