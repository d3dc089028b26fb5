"""Two `vitK` cuts on Qwen3-VL: each DeepStack tap reads the units alive at its block (every unit
before the first cut, the first cut's between the cuts, the second's after), and what reaches
the language model at the last cut's kept positions equals the tower run by hand
(see tests/engine/test_vit_qwen3.py for the single-cut version)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import pruneware
from tests.engine.test_vit_qwen3 import _block0_input, _lm_inputs
from tests.tiny import IMAGE_TOKEN, qwen_inputs, tiny_qwen3_vl


@pytest.fixture(scope="module")
def model():
    return tiny_qwen3_vl(layers=4, deepstack=(0, 1, 2, 3))  # a 4-block tower, a tap after every block


@pytest.mark.parametrize("plan", ["random@vit1:0.75,random@vit3:0.5", "random@pre-vit:0.75,divprune@vit2:0.5"])
def test_deepstack_taps_read_the_units_alive_at_their_block(model, plan):
    inputs = qwen_inputs(model, [(3, [(8, 12), (4, 8)], 4)])
    seen, _, report = _lm_inputs(model, inputs, plan)
    visual = model.model.visual
    x, (cos, sin) = _block0_input(model, inputs)
    positions = (inputs["input_ids"][0] == IMAGE_TOKEN).nonzero().squeeze(1)
    cuts = [(0 if s.where == "pre-vit" else int(s.where[3:]), torch.isin(positions, s.kept[0]))
            for s in report.stages[:2]]
    frames = [(0, 96), (96, 128)]  # each image's patch rows
    alive = torch.ones(positions.numel(), dtype=torch.bool)
    taps = []
    with torch.no_grad():
        for b, blk in enumerate(visual.blocks):
            alive = next((keep for block, keep in reversed(cuts) if block <= b), alive)
            for start, end in frames:
                units = torch.arange(start // 4, end // 4)
                r = (units[alive[units]][:, None] * 4 + torch.arange(4)).reshape(-1)
                x[r] = blk(x[r], cu_seqlens=torch.tensor([0, r.numel()], dtype=torch.int32),
                           position_embeddings=(cos[r], sin[r]))
            taps.append((alive.clone(), visual.deepstack_merger_list[b](x[(alive.nonzero().squeeze(1)[:, None] * 4
                                                                           + torch.arange(4)).reshape(-1)])))
        final = cuts[-1][1]
        merged = visual.merger(x[(final.nonzero().squeeze(1)[:, None] * 4 + torch.arange(4)).reshape(-1)])
    assert not (cuts[1][1] & ~cuts[0][1]).any()
    slots = positions[final]
    torch.testing.assert_close(seen["embeds"][0, slots], merged, atol=1e-5, rtol=1e-5)
    rank = seen["mask"][0].long().cumsum(0) - 1  # the row of each visual position in the DeepStack tensors
    for (tap_alive, tap), ours in zip(taps, seen["taps"], strict=True):
        rows_of_final = torch.isin(tap_alive.nonzero().squeeze(1), final.nonzero().squeeze(1))
        torch.testing.assert_close(ours[rank[slots]], tap[rows_of_final], atol=1e-5, rtol=1e-5)


def test_vision_flops_count_each_deepstack_merger_where_it_ran():
    eager = tiny_qwen3_vl(attn="eager", layers=4, deepstack=(0, 1, 2, 3))
    inputs = qwen_inputs(eager, [(3, [(8, 12)], 4)])
    with torch.no_grad(), pruneware.prune(eager, "random@vit1:0.5,random@vit3:0.25") as run, \
            FlopCounterMode(display=False) as counter:
        eager(**inputs, use_cache=False)
    tower = next(v for k, v in counter.get_flop_counts().items() if k.endswith("model.visual"))
    assert sum(run.report.vision_flops) == pytest.approx(float(sum(tower.values())))
    assert [s.n_after for s in run.report.stages[:2]] == [[12], [6]]
