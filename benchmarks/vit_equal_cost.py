"""Vision-side plans at equal vision cost: a markdown table from a `pruneware eval` run's rows.

Each plan's accuracy (95% Wilson interval), its mean vision GFLOPs per image and visual tokens
in the language model, and the paired difference of accuracy (same questions) against the
`resize` plan and against the best `pre` plan in the run, with its 95% interval
(``findings.paired``).

    pruneware eval --model tiny-qwen2.5-vl --limit 200 --out runs/vit-qwen \\
        --plans "resize@pre:0.65,random@vit1:0.55,divprune@vit1:0.55,divprune@pre:0.55"
    python benchmarks/vit_equal_cost.py runs/vit-qwen/rows.jsonl
"""

from __future__ import annotations

import sys

from eval_table import wilson  # benchmarks/ is the script's folder, so on sys.path
from findings import load_rows, paired


def _mean(rows: dict[str, dict], key: str) -> float:
    return sum(r[key] for r in rows.values()) / len(rows)


def table(rows: dict[str, dict[str, dict]]) -> str:
    plans = {next(iter(v.values()))["plan"]: v for v in rows.values()}
    resize = next((p for p in plans if p.startswith("resize@")), None)
    pre = [p for p in plans if "@pre:" in p and not p.startswith("resize@")]
    best_pre = max(pre, key=lambda p: _mean(plans[p], "score")) if pre else None
    out = ["| plan | n | accuracy [95% CI] | vision GFLOPs / image | LM visual tokens | vs resize [95% CI] "
           f"| vs {best_pre or 'best pre'} [95% CI] |", "|---|---|---|---|---|---|---|"]
    for plan, answers in plans.items():
        acc, n = _mean(answers, "score"), len(answers)
        lo, hi = wilson(acc, n)
        cells = []
        for other in (resize, best_pre):
            if other is None or other == plan:
                cells.append("-")
                continue
            d = paired(answers, plans[other])
            cells.append(f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]")
        out.append(f"| `{plan}` | {n} | {acc:.3f} [{lo:.2f}, {hi:.2f}] | {_mean(answers, 'vision_flops') / 1e9:.3f} "
                   f"| {_mean(answers, 'visual_tokens'):.0f} | {cells[0]} | {cells[1]} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(table(load_rows(sys.argv[1:])))
