"""Vision-side FLOPs: the analytic count equals torch's FLOP counter on the real towers, equals a
hand formula on a tiny config, and only `resize` on Qwen lowers it."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import pruneware
from pruneware.adapters import adapter_for
from pruneware.adapters.vision_flops import llava_image_flops
from pruneware.evals.runner import sample_vision_flops
from tests.tiny import (
    llava_inputs, llava_next_inputs, qwen_inputs, tiny_llava, tiny_llava_next, tiny_qwen, tiny_qwen2_vl, tiny_qwen3_vl,
)  # fmt: skip


def _counted(fn) -> float:
    """FLOPs torch counts for fn() (matmuls, convolutions, attention; 2 per multiply-add)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def test_llava_hand_formula_on_a_tiny_config():
    model = tiny_llava(image_size=56)  # CLIP: 4x4 patches + [CLS], width 32, MLP 64, 2 layers; LM width 64
    vc, h = model.config.vision_config, model.config.text_config.hidden_size
    n, d, i = 17, vc.hidden_size, vc.intermediate_size
    per_layer = 2 * n * 4 * d * d + 2 * n * 2 * d * i + 4 * n * n * d
    patch = 2 * 16 * 3 * 14 * 14 * d
    projector = 2 * 16 * d * h + 2 * 16 * h * h  # `default` strategy: [CLS] dropped before the projector
    assert llava_image_flops(model.config, 56, 56) == patch + vc.num_hidden_layers * per_layer + projector


def test_llava_count_equals_the_flop_counter():
    model = tiny_llava(attn="eager")  # torch's counter skips the CPU sdpa kernel; the arithmetic is the same
    inputs = llava_inputs(model, [(3, 2, 4)])
    measured = _counted(lambda: model.model.get_image_features(pixel_values=inputs["pixel_values"]))
    assert adapter_for(model).input_vision_flops(inputs) == [pytest.approx(measured / 2)] * 2


def test_llava_next_count_equals_the_flop_counter_per_image():
    model = tiny_llava_next(attn="eager")
    sizes = [(84, 84), (42, 84), (28, 28)]  # 5, 3 and 3 tiles of 28 px (base + the best pinpoint's)
    inputs = llava_next_inputs(model, [(3, sizes[:2], 2), (2, sizes[2:], 4)])
    per_image = adapter_for(model).input_vision_flops(inputs)
    assert len(per_image) == 3 and per_image[0] > per_image[1] == per_image[2] > 0
    for i, flops in enumerate(per_image):
        one = {k: inputs[k][i : i + 1] for k in ("pixel_values", "image_sizes")}
        measured = _counted(lambda one=one: model.model.get_image_features(one["pixel_values"], one["image_sizes"]))
        assert flops == pytest.approx(measured)


@pytest.mark.parametrize(
    "build, grids",
    [
        (tiny_qwen, [(8, 12), (12, 20)]),  # Qwen2.5-VL: 56-px windows (2x2 merged units) and full blocks
        (tiny_qwen2_vl, [(8, 12), (4, 4)]),
        (tiny_qwen3_vl, [(8, 12), (4, 8)]),  # three DeepStack mergers
    ],
)
def test_qwen_count_equals_the_flop_counter(build, grids):
    model = build(attn="eager")
    if model.config.model_type == "qwen2_5_vl":  # make its one block windowed (the full-block path is the others')
        model.config.vision_config.fullatt_block_indexes = [1]
        model = type(model)(model.config).eval()
    inputs = qwen_inputs(model, [(2, grids, 3)])
    per_image = adapter_for(model).input_vision_flops(inputs)
    measured = _counted(lambda: model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]))
    assert sum(per_image) == pytest.approx(measured)
    for (h, w), flops in zip(grids, per_image, strict=True):
        one = qwen_inputs(model, [(2, [(h, w)], 3)])
        alone = _counted(lambda one=one: model.model.visual(one["pixel_values"], grid_thw=one["image_grid_thw"]))
        assert flops == pytest.approx(alone)


def test_qwen25_windows_cost_less_than_full_attention():
    model = tiny_qwen()
    vc = model.config.vision_config
    vc.fullatt_block_indexes = [0]
    full = adapter_for(model).image_flops(1, 16, 16)
    vc.fullatt_block_indexes = [5]  # the one block is windowed now (8x8 merged units in 2x2 windows)
    windowed = adapter_for(model).image_flops(1, 16, 16)
    d = vc.hidden_size
    assert full - windowed == 4 * 256**2 * d - 16 * 4 * 16**2 * d


def test_reports_record_what_the_tower_ran_on():
    """Qwen `resize` lowers the vision FLOPs to the smaller image's; other plans keep the
    unpruned tower's, on Qwen and on LLaVA (whose `resize` pools after the tower)."""
    model = tiny_qwen()
    inputs = qwen_inputs(model, [(3, [(12, 16)], 4), (2, [(8, 8)], 5)])
    unpruned = adapter_for(model).input_vision_flops(inputs)
    for plan in ("divprune@pre:0.25", "fastv@2:0.25"):
        with pruneware.prune(model, plan) as run, torch.no_grad():
            model(**inputs)
        assert run.report.vision_flops == unpruned
    with pruneware.prune(model, "resize@pre:0.25") as run, torch.no_grad():
        model(**inputs)
    resized = run.report.vision_flops
    assert [k.numel() for k in run.report.stages[0].kept] == [12, 4]  # 3x4 and 2x2 token grids
    adapter = adapter_for(model)
    assert resized == [adapter.image_flops(1, 6, 8), adapter.image_flops(1, 4, 4)]
    assert all(r < u for r, u in zip(resized, unpruned, strict=True))
    assert sample_vision_flops(run.report, 0, inputs, model) == resized[0]
    assert sample_vision_flops(None, 1, inputs, model) == unpruned[1]  # the unpruned row, from the inputs

    llava = tiny_llava()
    inputs = llava_inputs(llava, [(3, 1, 4), (2, 1, 6)])
    for plan in ("resize@pre:4", "divprune@pre:4"):
        with pruneware.prune(llava, plan) as run, torch.no_grad():
            llava(**inputs)
        assert run.report.vision_flops == adapter_for(llava).input_vision_flops(inputs) == [llava_image_flops(llava.config, 56, 56)] * 2


def test_generate_reports_the_prefill_towers_once():
    model = tiny_qwen()
    inputs = qwen_inputs(model, [(3, [(8, 12)], 4)])
    with pruneware.prune(model, "resize@pre:0.5") as run, torch.no_grad():
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert len(run.report.vision_flops) == 1
    assert run.report.vision_flops[0] < adapter_for(model).input_vision_flops(inputs)[0]


def test_eval_table_shows_vision_flops():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("eval_table", Path(__file__).parents[2] / "benchmarks" / "eval_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    row = {"plan": "resize", "avg_tokens": 64, "plans_run": ["resize@pre:64"], "avg_visual_tokens": 64, "n": 10,
           "accuracy": 0.5, "relative_accuracy": 0.6, "kl": 0.1, "top1_agreement": 0.7,
           "per_task": {"counting": 0.1, "spatial": 0.2, "glyph": 0.3}, "flops": 2.5e9, "vision_flops": 1.25e9}
    lines = module.table({"results": [row]}).splitlines()
    assert lines[0].rstrip(" |").endswith("vision GFLOPs / image")
    assert lines[2].endswith("| 2.500 | 1.250 |")
