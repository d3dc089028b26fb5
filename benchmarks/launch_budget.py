"""Launch and host-sync budget of every registered policy: what a pruned prefill adds to the model's own work.

At batch 1 on a GPU, HF prefill is bound by kernel launches and the host, so every op and
every host sync a stage adds shows up in time to first token, whoever issues it. This counts,
per forward of a random-weight LLaVA (576 image tokens, the model of cpu_overhead.py), on the CPU,
with `pruneware.engine.profiling`:
  - ops: every top-level `aten::` op the torch profiler sees (an aten op not inside another);
  - syncs: calls that bring a tensor's value to the host: `.item()`, `.tolist()`, `.cpu()`,
    `int()`, `float()`, `bool()` and `__index__` of a tensor (each is a device sync on a GPU).
Each plan's count is minus the unpruned forward of the same inputs: everything the user pays,
the policy's scoring and merging included. The plans are every registered policy (from the
registry) at every place it may run: `pre`, one stage in the LLM, three stages in the LLM; each
at batch 1 and on a left-padded batch of 2 (prompts of different lengths). The budget is
<= 40 extra ops and <= 2 extra syncs per stage (the plan's extra over its stage count). The
counts are deterministic (they do not depend on timing), so they hold on any machine.

    python benchmarks/launch_budget.py [--layers 8] [--plans P ...] [--detail] [--json out.json]
        [--model llava|qwen2.5-vl]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import transformers
from cpu_overhead import IMAGE_TOKEN, build_model, make_inputs

from pruneware.engine.profiling import (
    OPS_PER_STAGE, SYNCS_PER_STAGE, budget_plans, plan_cost, stage_count, within_budget,
)
from pruneware.errors import PlanError


def padded_inputs() -> dict:
    """A left-padded batch of 2: the second prompt has 6 fewer text tokens before the image."""
    inputs = make_inputs(2)
    ids, mask = inputs["input_ids"].clone(), inputs["attention_mask"].clone()
    ids[1, 6:] = inputs["input_ids"][1, :-6].clone()
    ids[1, :6], mask[1, :6] = 0, 0
    assert int((ids == IMAGE_TOKEN).sum()) == 2 * 576
    return {**inputs, "input_ids": ids, "attention_mask": mask}


def qwen_model_and_batches(layers: int) -> tuple[torch.nn.Module, dict]:
    """`--model qwen2.5-vl`: a random-weight Qwen2.5-VL (4 vision blocks, 1 and 3 over whole frames,
    windows of 2x2 units) with one 16x16-patch image (64 visual tokens) per prompt; batch 1 and a
    left-padded batch of 2 whose second prompt is 6 tokens shorter."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from pruneware.models.tiny_configs import IDS, tiny_config

    torch.manual_seed(0)
    config = tiny_config("qwen2.5-vl", layers=layers, vision={"depth": 4, "fullatt_block_indexes": [1, 3]},
                         bos_token_id=None, eos_token_id=None)
    config._attn_implementation = "sdpa"
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    vc, g = config.vision_config, torch.Generator().manual_seed(0)
    patch = 3 * vc.temporal_patch_size * vc.patch_size**2
    image = [IDS["vision_start"]] + [IDS["image"]] * 64 + [IDS["vision_end"]]

    def batch(shorter: list[int]) -> dict:
        rows = [torch.randint(1, 80, (8 - s,), generator=g).tolist() + image
                + torch.randint(1, 80, (24,), generator=g).tolist() for s in shorter]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == IDS["image"]).int(),
                "pixel_values": torch.randn(len(rows) * 256, patch, generator=g),
                "image_grid_thw": torch.tensor([[1, 16, 16]] * len(rows))}

    return model, {"batch 1": batch([0]), "padded 2": batch([0, 6])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--plans", nargs="+", default=None, help="default: every registered policy at every place")
    parser.add_argument("--detail", action="store_true", help="also print the extra ops of each plan by name")
    parser.add_argument("--json", default=None)
    parser.add_argument("--model", choices=("llava", "qwen2.5-vl"), default="llava",
                        help="llava: cpu_overhead.py's (576 image tokens); qwen2.5-vl: a tiny one (64 image tokens)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.model == "llava":
        model = build_model(layers=args.layers)
        batches = {"batch 1": make_inputs(1), "padded 2": padded_inputs()}
    else:
        model, batches = qwen_model_and_batches(args.layers)
    base = {name: plan_cost(model, inputs, None) for name, inputs in batches.items()}
    rows = []
    for plan in args.plans or budget_plans(args.layers):
        stages = stage_count(plan)
        row = {"plan": plan, "stages": stages}
        try:
            costs = {name: plan_cost(model, inputs, plan).minus(base[name]) for name, inputs in batches.items()}
        except PlanError as err:
            print(f"{plan:58} refused on this model: {err}", flush=True)
            continue
        for name, extra in costs.items():
            row[name] = {"extra_ops": extra.ops, "extra_syncs": extra.syncs, "within": within_budget(extra, stages),
                         "ops_by_name": dict(extra.names.most_common())}
        rows.append(row)
        print(_line(row), flush=True)
        if args.detail:
            for name in batches:
                print(f"    {name}: {row[name]['ops_by_name']}")
    meta = {"date": time.strftime("%Y-%m-%d"), "model": args.model, "layers": args.layers, "torch": torch.__version__,
            "transformers": transformers.__version__, "budget": [OPS_PER_STAGE, SYNCS_PER_STAGE],
            "unpruned": {name: {"ops": c.ops, "syncs": c.syncs} for name, c in base.items()}}
    counts = "; ".join(f"{n}: {c.ops} ops, {c.syncs} syncs" for n, c in base.items())
    print(f"unpruned ({args.layers} layers): {counts}")
    print(f"budget: {OPS_PER_STAGE} ops and {SYNCS_PER_STAGE} syncs per stage; "
          f"{sum(r['batch 1']['within'] and r['padded 2']['within'] for r in rows)} of {len(rows)} plans within")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1)


def _line(row: dict) -> str:
    """One table row: per batch, extra ops / syncs (per stage), and whether it is within budget."""
    cells = []
    for name in ("batch 1", "padded 2"):
        r, n = row[name], row["stages"]
        mark = "ok" if r["within"] else "OVER"
        cells.append(f"{name}: +{r['extra_ops']} ops +{r['extra_syncs']} syncs "
                     f"({r['extra_ops'] / n:.0f}/{r['extra_syncs'] / n:.1f} per stage) {mark}")
    return f"{row['plan']:58} {row['stages']}  " + " | ".join(cells)


if __name__ == "__main__":
    main()
