"""Launch and host-sync budget of each plan: what a pruned prefill adds to the model's own work.

At batch 1 on a GPU, HF prefill is bound by kernel launches and the host, so every op and
every host sync a stage adds shows up in time to first token. This counts, per forward of a
random-weight LLaVA (576 image tokens, the model of cpu_overhead.py), on the CPU:
  - ops: top-level `aten::` ops seen by the torch profiler (an aten op not inside another);
  - syncs: calls that bring a tensor's value to the host: `.item()`, `.tolist()`, `.cpu()`,
    `int()`, `float()` and `bool()` of a tensor (each is a device sync on a GPU).
It reports each plan's extra ops and syncs over the unpruned forward, in total and per stage,
and splits the work by who makes it (torch calls from Python and host syncs, attributed to the
innermost frame outside torch by `pruneware.engine.profiling`): the policy's own scoring
(`pruneware/policies/`, the score kernel and `attention_policy_scores`, which feeds it the
captured rows) or the engine (the rest of pruneware). The engine's cost per stage is the slope
over plans of 1 and 3 stages of one kind, so the fixed per-forward work (layout, report) is not
charged to the stages; the budget is <= 40 torch calls and <= 2 host syncs per stage. The counts
are deterministic (they do not depend on timing), so they hold on any machine.

    python benchmarks/launch_budget.py [--layers 8] [--batch 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import transformers
from cpu_overhead import build_model, make_inputs
from torch.profiler import ProfilerActivity, profile

import pruneware
from pruneware.engine.profiling import TorchCallCounter, count_host_syncs

PLANS = [
    "random@pre:0.25", "random@3:0.25", "fastv@3:0.25", "adaptinfer@1:0.5,adaptinfer@3:0.25,adaptinfer@6:0.1",
    "divprune@pre:0.25",
]
SLOPES = {  # a kind of stage: plans of 1 and 3 such stages (each stage drops tokens: budgets are of the original)
    "random, in-LLM": ("random@2:0.5", "random@2:0.5,random@4:0.25,random@6:0.125"),
    "fastv, in-LLM": ("fastv@2:0.5", "fastv@2:0.5,fastv@4:0.25,fastv@6:0.125"),
    "random, pre": ("random@4:0.25", "random@pre:0.5,random@4:0.25"),
}


def attribute(model, inputs: dict, plan: str) -> dict:
    """Torch calls and host syncs of one pruned forward, by owner (see pruneware.engine.profiling)."""
    with pruneware.prune(model, plan, seed=0), torch.no_grad():
        model(**inputs)
        calls = TorchCallCounter()
        with calls, count_host_syncs() as syncs:
            model(**inputs)
    return {"engine": calls.counts["engine"], "policy": calls.counts["policy"], "engine_syncs": syncs["engine"]}


def count_forward(model, inputs: dict) -> dict:
    """Top-level aten ops and host syncs of one `model(**inputs)`."""
    with torch.no_grad(), count_host_syncs() as syncs, profile(activities=[ProfilerActivity.CPU]) as prof:
        model(**inputs)
    ops = 0
    for event in prof.events():
        parent = event.cpu_parent
        if event.name.startswith("aten::") and (parent is None or not parent.name.startswith("aten::")):
            ops += 1
    return {"ops": ops, "syncs": syncs["total"]}


def measure(model, inputs: dict, plan: str | None) -> dict:
    with torch.no_grad():
        model(**inputs)  # warm-up: transformers installs its own hooks on a first forward
    if plan is None:
        return count_forward(model, inputs)
    with pruneware.prune(model, plan, seed=0):
        with torch.no_grad():
            model(**inputs)
        return count_forward(model, inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--plans", nargs="+", default=PLANS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build_model(layers=args.layers)
    inputs = make_inputs(args.batch)
    base = measure(model, inputs, None)
    rows = []
    for plan in args.plans:
        got = measure(model, inputs, plan)
        stages = len(pruneware.Plan.parse(plan).stages)
        extra_ops, extra_syncs = got["ops"] - base["ops"], got["syncs"] - base["syncs"]
        rows.append({"plan": plan, "stages": stages, "extra_ops": extra_ops, "extra_syncs": extra_syncs,
                     "ops_per_stage": round(extra_ops / stages, 1), "syncs_per_stage": round(extra_syncs / stages, 1)})
    for r in rows:
        r.update(attribute(model, inputs, r["plan"]))
    slopes = {}
    for kind, (one, more) in SLOPES.items():
        a, b = attribute(model, inputs, one), attribute(model, inputs, more)
        added = len(pruneware.Plan.parse(more).stages) - len(pruneware.Plan.parse(one).stages)
        slopes[kind] = {k: round((b[k] - a[k]) / added, 1) for k in ("engine", "policy", "engine_syncs")}
    meta = {"date": time.strftime("%Y-%m-%d"), "layers": args.layers, "batch": args.batch, "torch": torch.__version__,
            "transformers": transformers.__version__, "unpruned": base, "per_stage": slopes}
    print(f"unpruned ({args.layers} layers, batch {args.batch}): {base['ops']} ops, {base['syncs']} syncs")
    print(f"{'plan':56} {'+ops':>6} {'+syncs':>6} {'ops/stage':>9} {'syncs/stage':>11}")
    for r in rows:
        print(f"{r['plan']:56} {r['extra_ops']:>6} {r['extra_syncs']:>6} {r['ops_per_stage']:>9} {r['syncs_per_stage']:>11}"
              f"   engine {r['engine']}, policy {r['policy']} torch calls; engine {r['engine_syncs']} syncs")
    print("per added stage (slope over 1 and 3 stages): torch calls, and the engine's host syncs:")
    for kind, cost in slopes.items():
        print(f"  {kind:16} engine {cost['engine']:>6}  policy {cost['policy']:>6}  engine syncs {cost['engine_syncs']:>4}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
