"""TTFT of vision-side plans from a `gpu_suite.py --json` file: how far past the pre-LLM ceiling.

For each model and batch that timed `vision_plans` (the ``-tower`` entries on a GPU: the released
towers' shapes, Qwen2.5-VL-7B's 32-block tower and CLIP ViT-L/14-336; the tiny towers in the CPU
run), one markdown row per plan: TTFT (median ms), speedup over the unpruned model, and the ratio
to the `pre` plan at the same kept count (`random@pre:...`, when the run timed one): below 1 means
cutting the tower saves time that no pre-LLM plan can.

    python benchmarks/vit_ttft_summary.py gpu_suite.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(suite: dict) -> list[dict]:
    """One dict per (model, batch, vision-side or reference plan) of the suite's `vision_plans`."""
    out = []
    for model in suite["models"]:
        for batch in model["batches"]:
            timed = batch.get("vision_plans", [])
            pre = {p["plan"].split("@")[1].split(":")[1]: p["ttft_ms"] for p in timed if "@pre:" in p["plan"]}
            for p in timed:
                budget = p["plan"].split(":")[-1]
                out.append({"model": model["name"], "batch": batch["batch"], "plan": p["plan"], "kept": p["kept"],
                            "ttft_ms": p["ttft_ms"], "unpruned_ms": batch["unpruned"]["ttft_ms"],
                            "speedup": p["speedup_vs_unpruned"],
                            "vs_pre": None if "@pre:" in p["plan"] or budget not in pre else p["ttft_ms"] / pre[budget]})
    return out


def table(suite: dict) -> str:
    lines = ["| model | batch | plan | kept / image | TTFT ms | unpruned ms | speedup | TTFT / pre plan's |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows(suite):
        vs_pre = "-" if r["vs_pre"] is None else f"{r['vs_pre']:.3f}"
        lines.append(f"| {r['model']} | {r['batch']} | `{r['plan']}` | {r['kept']} | {r['ttft_ms']:.1f} | "
                     f"{r['unpruned_ms']:.1f} | {r['speedup']:.2f}x | {vs_pre} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(json.loads(Path(sys.argv[1]).read_text())))
