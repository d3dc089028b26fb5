"""A level whose samples each hold one visual run at their own slot (a left-padded batch, one
image per prompt) is cut from host-built tables (`engine/run_tables.py`): it must give exactly
what the sort-based path gives for the same level without that knowledge."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pruneware.engine import masks
from pruneware.engine.levels import next_level, root_level
from pruneware.engine.stage_inputs import query_layout, visual_picker
from pruneware.policies.needs import query_rows

STARTS, N, LENGTH = (5, 2, 7), 6, 16  # three samples, runs at slots 5.., 2.., 7.. of 6 visual tokens each


def roots():
    """(the root with per-sample runs known on the host, the same root without them)."""
    image_ids = torch.full((len(STARTS), LENGTH), -1)
    for b, start in enumerate(STARTS):
        image_ids[b, start:start + N] = 0
    spans = [(start, N) for start in STARTS]
    with_runs = root_level(image_ids, [N] * len(STARTS), [[N]] * len(STARTS), None, spans)
    assert with_runs.visual_starts == STARTS
    return with_runs, replace(with_runs, visual_starts=None, cache={})


def same_level(a, b) -> None:
    for name in ("index_prev", "index0", "orig", "valid", "image_ids"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.n_slots == b.n_slots and a.n_visual == b.n_visual


def test_runs_cut_like_the_sort_two_stages_deep():
    runs, plain = roots()
    assert torch.equal(runs.visual_first, plain.visual_first)
    keep = torch.tensor([[0, 2, 5], [1, 3, 4], [0, 1, 2]])
    child_runs, child_plain = next_level(runs, keep), next_level(plain, keep)
    same_level(child_runs, child_plain)
    assert child_runs.visual_starts == STARTS and child_plain.visual_starts is None
    assert torch.equal(child_runs.visual_first, child_plain.visual_first)
    again = torch.tensor([[0, 2], [1, 2], [0, 1]])
    same_level(next_level(child_runs, again), next_level(child_plain, again))
    hidden = torch.randn(len(STARTS), child_runs.length, 4)
    assert torch.equal(visual_picker(child_runs)(hidden), visual_picker(child_plain)(hidden))


def test_runs_pick_the_visual_slots_and_post_image_rows():
    runs, plain = roots()
    hidden = torch.randn(len(STARTS), LENGTH, 4)
    assert torch.equal(visual_picker(runs)(hidden), visual_picker(plain)(hidden))
    assert torch.equal(visual_picker(runs)(hidden[..., 0]), visual_picker(plain)(hidden[..., 0]))
    real = torch.ones(len(STARTS), LENGTH, dtype=torch.bool)
    real[1, :1] = False  # padding before sample 1's prompt
    real[2, -1] = False  # and after sample 2's (right padding): never a row
    rows = query_layout("post-image", runs, real, None, real.device, block=True)
    assert rows.run is not None  # sliced, not gathered
    want_slots, want_valid = query_rows("post-image", plain.visual, real)
    for b in range(len(STARTS)):
        got = set(rows.slots[b][rows.valid[b]].tolist())
        assert got == set(want_slots[b][want_valid[b]].tolist()) and got  # the same rows, each sample its own


@pytest.mark.parametrize("mask_batch", [3, 1])
def test_one_advanced_index_takes_the_rows_and_columns_of_a_mask(mask_batch):
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(mask_batch, 1, LENGTH, LENGTH, generator=g) > 0.3
    index0 = torch.stack([torch.randperm(LENGTH, generator=g)[:9].sort().values for _ in range(3)])
    valid = torch.ones(3, 9, dtype=torch.bool)
    got = masks.slice_prefill_mask(mask, index0, valid, "bool", torch.float32, all_valid=True)
    for b in range(3):
        want = mask[b if mask_batch > 1 else 0, 0][index0[b]][:, index0[b]]
        assert torch.equal(got[b, 0], want)
    assert got.shape == (3, 1, 9, 9)
