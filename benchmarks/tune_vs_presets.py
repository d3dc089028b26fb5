"""Tuned plans against the presets at the same budgets, from a `pruneware eval` rows.jsonl.

    python benchmarks/tune_vs_presets.py runs/tune-evidence/rows.jsonl --tuned 64=PLAN --tuned 96=PLAN ...

Per budget: every preset's accuracy (95% Wilson interval) and mean KL (95% normal interval),
the tuned plan's, and the paired difference tuned - best preset (the preset with the highest
accuracy at that budget; ties broken by KL), with 95% normal intervals over the same questions.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

Z = 1.959964


def wilson(hits: float, n: int) -> tuple[float, float]:
    if n == 0:
        return 0.0, 0.0
    p = hits / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / (1 + Z * Z / n)
    return centre - half, centre + half


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    n = len(values)
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / max(n - 1, 1))
    return m, m - Z * sd / math.sqrt(n), m + Z * sd / math.sqrt(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", type=Path)
    parser.add_argument("--tuned", action="append", default=[], help="BUDGET=PLAN, once per budget")
    args = parser.parse_args()
    by_variant: dict[str, dict[str, dict]] = defaultdict(dict)
    for line in args.rows.read_text().splitlines():
        row = json.loads(line)
        by_variant[row["variant"]][row["id"]] = row
    tuned = dict(item.split("=", 1) for item in args.tuned)
    out = []
    for budget, plan in tuned.items():
        b = float(budget)
        candidates = {v.split("|")[0]: rows for v, rows in by_variant.items() if v.endswith(f"|{b}")}
        tuned_rows = by_variant[f"{plan}|None"]
        table = []
        for name, rows in sorted(candidates.items()) + [(f"tuned: {plan}", tuned_rows)]:
            ids = sorted(rows)
            scores = [rows[i]["score"] for i in ids]
            acc = sum(scores) / len(scores)
            lo, hi = wilson(sum(scores), len(scores))
            kl, klo, khi = mean_ci([rows[i]["kl"] for i in ids])
            vis = sum(rows[i]["visual_tokens"] for i in ids) / len(ids)
            table.append({"plan": name, "n": len(ids), "accuracy": acc, "acc_ci": [lo, hi], "kl": kl,
                          "kl_ci": [klo, khi], "visual_tokens": vis})
        best = max((t for t in table if not t["plan"].startswith("tuned")), key=lambda t: (t["accuracy"], -t["kl"]))
        best_rows = candidates[best["plan"]]
        ids = sorted(set(best_rows) & set(tuned_rows))
        d_acc = mean_ci([tuned_rows[i]["score"] - best_rows[i]["score"] for i in ids])
        d_kl = mean_ci([tuned_rows[i]["kl"] - best_rows[i]["kl"] for i in ids])
        out.append({"avg_tokens": b, "table": table, "best_preset": best["plan"],
                    "tuned_minus_best": {"accuracy": d_acc, "kl": d_kl}})
        print(f"\navg_tokens={b:g}  (best preset by accuracy: {best['plan']})")
        print(f"{'plan':58} {'n':>5} {'accuracy [95% CI]':>24} {'KL [95% CI]':>28} {'vis/layer':>9}")
        for t in table:
            print(f"{t['plan'][:58]:58} {t['n']:5d} {t['accuracy']:.3f} [{t['acc_ci'][0]:.3f}, {t['acc_ci'][1]:.3f}]"
                  f"      {t['kl']:.4f} [{t['kl_ci'][0]:.4f}, {t['kl_ci'][1]:.4f}] {t['visual_tokens']:9.1f}")
        print(f"tuned - best: accuracy {d_acc[0]:+.3f} [{d_acc[1]:+.3f}, {d_acc[2]:+.3f}], "
              f"KL {d_kl[0]:+.4f} [{d_kl[1]:+.4f}, {d_kl[2]:+.4f}] (paired, n={len(ids)})")
    (args.rows.parent / "tune_vs_presets.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
