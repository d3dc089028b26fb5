"""`vitK` on Qwen3-VL: the DeepStack taps after the cut read the same kept units.

The reference runs the tower's blocks by hand from block 0's input (captured in an unpruned run:
patch embedding plus the interpolated position embedding, which a cut does not touch): every
frame's rows through blocks[:K], the kept units' rows from K on; each DeepStack merger on its
block's output, the PatchMerger at the end. What reaches the language model (the visual
embeddings and the DeepStack rows at the kept positions) must equal it; the language model's side
of DeepStack under pruning is tested with the `pre` stages (tests/engine/test_equivalence.py).
"""

from __future__ import annotations

import pytest
import torch

import pruneware
from tests.tiny import IMAGE_TOKEN, qwen_inputs, tiny_qwen3_vl


@pytest.fixture(scope="module")
def model():
    return tiny_qwen3_vl(layers=4, deepstack=(0, 1, 2, 3))  # a 4-block tower, a tap after every block


def _lm_inputs(model, inputs, plan=None):
    """(inputs_embeds [B, L, D], DeepStack rows per tap [n_visual, D], visual mask [B, L]) as the LM receives them."""
    seen = {}

    def hook(module, args, kwargs):
        seen.update(embeds=kwargs["inputs_embeds"].clone(), taps=[t.clone() for t in kwargs["deepstack_visual_embeds"]],
                    mask=kwargs["visual_pos_masks"].clone())

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)  # before the session's
    try:
        with torch.no_grad():
            if plan is None:
                logits = model(**inputs, use_cache=False).logits
                report = None
            else:
                with pruneware.prune(model, plan) as run:
                    logits = model(**inputs, use_cache=False).logits
                report = run.report
    finally:
        handle.remove()
    return seen, logits, report


def _block0_input(model, inputs):
    seen = {}

    def hook(module, args, kwargs):
        seen.update(x=args[0].clone(), pe=kwargs["position_embeddings"])

    handle = model.model.visual.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    finally:
        handle.remove()
    return seen["x"], seen["pe"]


@pytest.mark.parametrize("where", ["vit0", "vit2"])
def test_keep_all_is_bit_identical(model, where):
    inputs = qwen_inputs(model, [(3, [(8, 12), (4, 8)], 4)])
    _, ref, _ = _lm_inputs(model, inputs)
    _, out, _ = _lm_inputs(model, inputs, f"random@{where}:1.0")
    assert torch.equal(out, ref)


@pytest.mark.parametrize("block", [1, 2])
def test_deepstack_taps_read_the_kept_units(model, block):
    inputs = qwen_inputs(model, [(3, [(8, 12), (4, 8)], 4)])
    seen, _, report = _lm_inputs(model, inputs, f"random@vit{block}:0.5")
    visual = model.model.visual
    x, (cos, sin) = _block0_input(model, inputs)
    ids = inputs["input_ids"][0]
    positions = (ids == IMAGE_TOKEN).nonzero().squeeze(1)
    kept_units = torch.isin(positions, report.stages[0].kept[0])  # row-major over both images' units
    frames = [(0, 96), (96, 128)]  # each image's patch rows
    taps = []
    with torch.no_grad():
        for b, blk in enumerate(visual.blocks):
            for start, end in frames:
                units = torch.arange(start // 4, end // 4)
                if b >= block:
                    units = units[kept_units[units]]
                r = (units[:, None] * 4 + torch.arange(4)).reshape(-1)
                x[r] = blk(x[r], cu_seqlens=torch.tensor([0, r.numel()], dtype=torch.int32),
                           position_embeddings=(cos[r], sin[r]))
            rows = (kept_units.nonzero().squeeze(1)[:, None] * 4 + torch.arange(4)).reshape(-1)
            taps.append(visual.deepstack_merger_list[b](x[rows]))
        merged = visual.merger(x[rows])
    slots = positions[kept_units]
    torch.testing.assert_close(seen["embeds"][0, slots], merged, atol=1e-5, rtol=1e-5)
    rank = seen["mask"][0].long().cumsum(0) - 1  # the row of each visual position in the DeepStack tensors
    for tap, ours in zip(taps, seen["taps"], strict=True):
        torch.testing.assert_close(ours[rank[slots]], tap, atol=1e-5, rtol=1e-5)
    assert report.stages[0].n_after == [int(kept_units.sum())] == [16]


def test_vision_flops_count_each_deepstack_merger_where_it_ran(model):
    from torch.utils.flop_counter import FlopCounterMode

    eager = tiny_qwen3_vl(attn="eager", layers=4, deepstack=(0, 1, 2, 3))
    inputs = qwen_inputs(eager, [(3, [(8, 12)], 4)])
    with torch.no_grad(), pruneware.prune(eager, "random@vit2:0.25") as run, FlopCounterMode(display=False) as counter:
        eager(**inputs, use_cache=False)
    tower = next(v for k, v in counter.get_flop_counts().items() if k.endswith("model.visual"))
    assert sum(run.report.vision_flops) == pytest.approx(float(sum(tower.values())))
