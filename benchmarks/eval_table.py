"""Markdown table of a `pruneware eval` run, with 95% Wilson intervals on accuracy.

    python benchmarks/eval_table.py runs/baselines-eval/results.json
"""

from __future__ import annotations

import json
import math
import sys


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion ``p`` measured on ``n`` questions."""
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return centre - half, centre + half


def table(results: dict) -> str:
    rows = [
        "| plan | avg_tokens | plan that ran | visual tokens / layer | accuracy [95% CI] | relative | KL vs unpruned "
        "| top-1 agreement | counting | spatial | glyph | LM GFLOPs | vision GFLOPs / image |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in results["results"]:
        lo, hi = wilson(x["accuracy"], x["n"])
        t = x["per_task"]
        budget = int(x["avg_tokens"]) if x["avg_tokens"] else "-"
        rows.append(
            f"| {x['plan']} | {budget} | `{'; '.join(x['plans_run'])}` | {x['avg_visual_tokens']:.0f} "
            f"| {x['accuracy']:.3f} [{lo:.2f}, {hi:.2f}] | {x['relative_accuracy']:.2f} | {x['kl']:.3f} "
            f"| {x['top1_agreement']:.3f} | {t['counting']:.2f} | {t['spatial']:.2f} | {t['glyph']:.2f} "
            f"| {x['flops'] / 1e9:.3f} | {x.get('vision_flops', 0.0) / 1e9:.3f} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    data = json.load(open(sys.argv[1]))
    print(f"model {data['model']}, {data['n_examples']} questions, seed {data['seed']}\n")
    print(table(data))
