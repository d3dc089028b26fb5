"""Every plan against DivPrune at its budget, on the same questions, with paired 95% intervals.

    python benchmarks/vs_divprune.py runs/cdpruner/tiny-llava/rows.jsonl [more rows.jsonl ...]

Reads the rows of `pruneware eval --out` runs over the same questions (same model, ``--limit``
and ``--seed``; ``findings.load_rows`` refuses runs of different weights). For each budget it
prints one markdown row per plan: questions answered by every plan in the comparison, accuracy,
accuracy over unpruned, the gap to 97% of unpruned, per-task accuracy, and the paired difference
plan - DivPrune (``findings.paired``). A budget is the eval row's ``avg_tokens``, or the count of an
explicit ``policy@pre:N`` plan, or an explicit multi-stage plan's measured average visual tokens per
layer, rounded (a tuned plan; within 3% of a requested budget it counts as that one); a plan with
fewer questions than DivPrune at that budget (a run cut short) is left out. Then, per budget, the questions each plan gets wrong by task.
"""

from __future__ import annotations

import re
import sys
from collections import Counter

from findings import load_rows, paired  # benchmarks/ is the script's folder, so on sys.path


def budget_of(variant: str, rows: dict[str, dict] | None = None) -> int | None:
    """The visual-token budget of an eval variant (``divprune|64.0`` or ``cdpruner[...]@pre:64|None``);
    for another explicit plan (a tuned multi-stage one), the mean of its rows' average visual tokens
    per layer, rounded, when `rows` ({question id: row}) are given."""
    plan, _, avg = variant.partition("|")
    if avg not in ("", "None"):
        return round(float(avg))
    match = re.fullmatch(r"[\w\-]+(?:\[[^\]]*\])?@pre:(\d+)(?::\w+)?", plan)
    if match:
        return int(match[1])
    if rows and plan != "none" and "@" in plan:
        return round(sum(r["visual_tokens"] for r in rows.values()) / len(rows))
    return None


def snap(budget: int | None, budgets: set[int]) -> int | None:
    """A measured budget within 3% of a requested one counts as that one (a tuned plan solved to
    63.6 tokens runs against DivPrune at 64)."""
    near = [b for b in budgets if budget is not None and abs(budget - b) <= 0.03 * b]
    return min(near, key=lambda b: abs(budget - b)) if near else budget


def main(paths: list[str]) -> None:
    rows = load_rows(paths)
    none = rows.get("none|None")
    requested = {b for v in rows if (b := budget_of(v)) is not None}
    of = {v: snap(budget_of(v, r), requested) for v, r in rows.items()}
    budgets = sorted({b for b in of.values() if b is not None})
    for budget in budgets:
        plans = {v: r for v, r in rows.items() if of[v] == budget}
        base = next((v for v in plans if v.startswith("divprune|") or v.startswith("divprune@")), None)
        if base is None:
            continue
        plans = {v: r for v, r in plans.items() if len(r) >= len(plans[base])}  # runs cut short leave out
        ids = set.intersection(*(set(r) for r in plans.values()), *([set(none)] if none else []))
        unpruned = sum(none[i]["score"] for i in ids) / len(ids) if none else None
        tasks = sorted({plans[base][i]["task"] for i in ids})
        print(f"\n### {budget} tokens ({len(ids)} questions; unpruned {unpruned:.3f})\n" if unpruned is not None else
              f"\n### {budget} tokens ({len(ids)} questions)\n")
        print("| plan | accuracy | relative | gap to 97% | " + " | ".join(tasks) + " | plan - divprune [95% CI] |")
        print("|---|---|---|---|" + "---|" * len(tasks) + "---|")
        for v in sorted(plans, key=lambda v: (v != base, v)):
            r = {i: plans[v][i] for i in ids}
            acc = sum(x["score"] for x in r.values()) / len(r)
            rel = f"{acc / unpruned:.3f}" if unpruned else "-"
            gap = f"{0.97 * unpruned - acc:+.3f}" if unpruned else "-"
            per_task = []
            for t in tasks:
                scores = [x["score"] for x in r.values() if x["task"] == t]
                per_task.append(f"{sum(scores) / len(scores):.3f}")
            if v == base:
                vs = "(baseline)"
            else:
                p = paired(r, {i: plans[base][i] for i in ids})
                vs = f"{p['diff']:+.3f} [{p['lo']:+.3f}, {p['hi']:+.3f}]"
            print(f"| `{v.split('|')[0]}` | {acc:.3f} | {rel} | {gap} | " + " | ".join(per_task) + f" | {vs} |")
        print("\nwrong answers by task: " + "; ".join(
            f"`{v.split('|')[0]}` " + ", ".join(f"{t} {n}" for t, n in sorted(
                Counter(plans[v][i]["task"] for i in ids if plans[v][i]["score"] < 1).items()))
            for v in sorted(plans, key=lambda v: (v != base, v))))


if __name__ == "__main__":
    main(sys.argv[1:])
