"""Vision-side plans at equal cost: a markdown table from `pruneware eval` runs' rows.

One row per vision-side plan (a `pre-vit` or `vitK` stage): its accuracy (95% Wilson interval),
mean vision GFLOPs per image (and its share of the unpruned tower's), the visual tokens the
language model sees, and paired differences of accuracy on the same questions (``findings.paired``,
95% interval) against

* `resize` at matched vision GFLOPs: the `resize@pre` plan whose vision cost is nearest;
* `resize` at matched LLM tokens: the `resize@pre` plan whose visual tokens are nearest;
* the best `pre` plan at matched LLM tokens: of the other `@pre` plans whose tokens are nearest,
  the most accurate (they run the whole tower).

A partner counts as matched only within ``--tol`` (default 10%) of the plan's cost; otherwise the
cell is "-" (on LLaVA-1.5 `resize` pools after the tower, so nothing is matched on vision cost).
The reference plans (resize, pre, none) follow, with their costs.

    pruneware eval --model tiny-qwen2.5-vl --limit 1000 --out runs/vit-qwen \\
        --plans "resize@pre:0.65;divprune@vit1:0.55;pixelprune@pre-vit:0.63;divprune@pre:0.55;none"
    python benchmarks/vit_equal_cost.py runs/vit-qwen/rows.jsonl [more rows.jsonl of the same model]
"""

from __future__ import annotations

import argparse
import math

from eval_table import wilson  # benchmarks/ is the script's folder, so on sys.path
from findings import load_rows, paired


def _mean(rows: dict[str, dict], key: str) -> float:
    return sum(r[key] or 0.0 for r in rows.values()) / len(rows)


def is_vision_side(plan: str) -> bool:
    return "@vit" in plan or "@pre-vit" in plan


def nearest(plan: str, candidates: list[str], cost: dict[str, float], tol: float) -> list[str]:
    """The candidates whose cost is nearest `plan`'s (ties all), if within `tol` of it (relative)."""
    if not candidates or cost[plan] <= 0:
        return []
    gap = {c: abs(math.log(max(cost[c], 1e-12) / cost[plan])) for c in candidates}
    best = min(gap.values())
    return [c for c in candidates if gap[c] == best] if best <= math.log1p(tol) else []


def _diff(a: dict, b: dict, partner: str) -> str:
    d = paired(a, b)
    return f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] vs `{partner}`"


def table(rows: dict[str, dict[str, dict]], tol: float = 0.1, common: bool = False, min_n: int = 0) -> str:
    """The markdown table; plans answered on fewer questions than the most answered are left out
    (named in a last line), so every paired difference is over the same questions. With `common`,
    the plans answered on at least `min_n` questions are cut to the questions all of them answered."""
    every = {next(iter(v.values()))["plan"]: v for v in rows.values()}
    if common:
        kept = [a for a in every.values() if len(a) >= min_n]
        ids = set.intersection(*(set(a) for a in kept))
        every = {p: {i: a[i] for i in ids if i in a} for p, a in every.items()}
    most = max(len(a) for a in every.values())
    plans = {p: a for p, a in every.items() if len(a) == most}
    vision = {p: _mean(a, "vision_flops") / 1e9 for p, a in plans.items()}
    tokens = {p: _mean(a, "visual_tokens") for p, a in plans.items()}
    acc = {p: _mean(a, "score") for p, a in plans.items()}
    full = _mean(every["none"], "vision_flops") / 1e9 if "none" in every else max(vision.values())  # the unpruned tower
    resize = [p for p in plans if p.startswith("resize@")]
    pre = [p for p in plans if "@pre:" in p and not p.startswith("resize@") and "," not in p]
    out = ["| plan | n | accuracy [95% CI] | vision GFLOPs / image | LM visual tokens | vs resize, matched vision GFLOPs "
           "[95% CI] | vs resize, matched LLM tokens | vs best pre, matched LLM tokens |", "|---|---|---|---|---|---|---|---|"]

    def head(p: str) -> str:
        lo, hi = wilson(acc[p], len(plans[p]))
        return (f"| `{p}` | {len(plans[p])} | {acc[p]:.3f} [{lo:.3f}, {hi:.3f}] | {vision[p]:.3f} ({vision[p] / full:.0%}) "
                f"| {tokens[p]:.0f} |")

    for p in sorted((p for p in plans if is_vision_side(p)), key=lambda p: (vision[p], p)):
        cells = []
        for pool, cost in ((resize, vision), (resize, tokens), (pre, tokens)):
            match = nearest(p, pool, cost, tol)
            best = max(match, key=lambda c: acc[c]) if match else None
            cells.append(_diff(plans[p], plans[best], best) if best else "-")
        out.append(f"{head(p)} {' | '.join(cells)} |")
    for p in sorted((p for p in plans if not is_vision_side(p)), key=lambda p: (vision[p], tokens[p])):
        out.append(f"{head(p)} - | - | - |")
    short = [f"`{p}` ({len(a)})" for p, a in every.items() if p not in plans]
    if short:
        out.append(f"\nLeft out, answered on fewer than {most} questions: {', '.join(short)}.")
    return "\n".join(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", nargs="+", help="rows.jsonl of `pruneware eval --out` runs of one model")
    parser.add_argument("--tol", type=float, default=0.1, help="relative cost gap a matched partner may have")
    parser.add_argument("--common", action="store_true",
                        help="cut the plans to the questions all of them answered (those with >= --min-n answers)")
    parser.add_argument("--min-n", type=int, default=0, help="with --common: plans answered on fewer are left out")
    args = parser.parse_args()
    print(table(load_rows(args.rows), args.tol, args.common, args.min_n))
