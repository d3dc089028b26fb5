"""CPU overhead of a `vitK` stage against running the tower natively on the kept units.

For a random-weight Qwen2.5-VL vision tower (8 blocks, width 128, full attention at blocks 3
and 7, windows of 4x4 units) on one 448x448 image (32x32 patches, 256 units), side by side in
one run, interleaved round by round (the order alternates):
  - cut: `visual(pixels, grid_thw)` inside `pruneware.prune(model, "random@vit4:0.5")`: the
    session's hooks pick the units (random), cut the tower before block 4 and spread the merger's
    tokens back;
  - direct: the tower's own modules in a plain loop, with the same kept units chosen beforehand:
    patch embedding, window permutation and rotary rows as HF computes them, blocks[:4] on every
    row, blocks[4:] on the kept rows with their cu_seqlens / window bounds prebuilt, the merger
    on the kept rows: what a cut tower cannot beat;
  - full: the unpruned tower, for scale.
Overhead = stat(cut) / stat(direct); the goal is <= 1.10. Times are the calling thread's CPU
time with one torch thread, so other processes on the cores do not skew the ratio.

    python benchmarks/vit_overhead.py [--rounds 20] [--stat median|min] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import transformers
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

import pruneware
from pruneware.adapters import adapter_for
from pruneware.models.tiny_configs import tiny_config

BLOCK = 4
PLAN = f"random@vit{BLOCK}:0.5"


def build():
    torch.manual_seed(0)
    vision = dict(depth=8, hidden_size=128, intermediate_size=256, num_heads=4, window_size=224,
                  fullatt_block_indexes=[3, 7], patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    config = tiny_config("qwen2.5-vl", layers=1, vision=vision, ids={"image": 90, "video": 91})
    config._attn_implementation = "sdpa"
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def direct(visual, pixels, grid, cut) -> torch.Tensor:
    """The tower's own modules, blocks[BLOCK:] on the kept rows (cut prebuilt)."""
    unit = visual.spatial_merge_unit
    position_ids = get_vision_position_ids(grid, visual.spatial_merge_size)
    window_index, cu_window = get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size, visual.patch_size)
    cu_full = get_vision_cu_seqlens(grid)
    hidden = visual.patch_embed(pixels)
    n = hidden.shape[0]
    hidden = hidden.view(n // unit, unit, -1)[window_index].reshape(n, -1)
    cos, sin = visual.rotary_pos_emb(hidden, position_ids)
    cos, sin = (x.view(n // unit, unit, -1)[window_index].reshape(n, -1) for x in (cos, sin))
    for b, blk in enumerate(visual.blocks):
        if b == BLOCK:
            hidden, cos, sin = hidden[cut.rows], cos[cut.rows], sin[cut.rows]
            cu_full, cu_window = cut.cu_full, cut.cu_window
        cu = cu_full if b in visual.fullatt_block_indexes else cu_window
        hidden = blk(hidden, cu_seqlens=cu, position_embeddings=(cos, sin))
    return visual.merger(hidden)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--stat", choices=["median", "min"], default="median")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build()
    visual = model.model.visual
    grid = torch.tensor([[1, 32, 32]])
    pixels = torch.randn(32 * 32, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0))
    keep = torch.zeros(256, dtype=torch.bool)
    keep[torch.randperm(256, generator=torch.Generator().manual_seed(1))[:128]] = True
    cut = adapter_for(model).vision_cut().cut(grid, keep)
    session = pruneware.prune(model, PLAN)
    runs = {
        "full": lambda: visual(pixels, grid_thw=grid),
        "cut": lambda: visual(pixels, grid_thw=grid),
        "direct": lambda: direct(visual, pixels, grid, cut),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.no_grad():
        for r in range(args.rounds + 2):
            order = ["full", "cut", "direct"] if r % 2 else ["full", "direct", "cut"]
            for name in order:
                if name == "cut":
                    session.attach()
                start = time.thread_time()
                runs[name]()
                elapsed = time.thread_time() - start
                if name == "cut":
                    session.detach()  # its hooks (and what they recorded) go with it
                if r >= 2:  # two warm-up rounds
                    times[name].append(elapsed)
    stat = statistics.median if args.stat == "median" else min
    result = {k: stat(v) * 1e3 for k, v in times.items()}
    result["overhead"] = result["cut"] / result["direct"]
    result["cut_vs_full"] = result["cut"] / result["full"]
    meta = {"torch": torch.__version__, "transformers": transformers.__version__, "machine": platform.machine(),
            "rounds": args.rounds, "stat": args.stat, "plan": PLAN}
    print(json.dumps({**meta, **{k: round(v, 3) for k, v in result.items()}}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**meta, **result}, f, indent=1)


if __name__ == "__main__":
    main()
