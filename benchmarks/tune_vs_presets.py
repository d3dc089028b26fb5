"""Tuned plans against presets at the same avg_tokens budgets, on a held-out synthetic split.

    python benchmarks/tune_vs_presets.py --tuned runs/tune-evidence/tuned-64.json \\
        --tuned runs/tune-evidence/tuned-96.json --tuned runs/tune-evidence/tuned-128.json \\
        --presets divprune,fastv --n 1000 --seed 0 --out runs/tune-evidence/heldout.json

The held-out questions are `pruneware eval --limit N --seed S`'s (the synthetic eval split; the
tuner calibrates on the train split). One prefill per plan and question: accuracy is the exact
match of the first answer token, which on the embedded tiny models (one-word answers, a word-level
tokenizer) is the greedy answer `pruneware eval` scores; KL is of that token's distribution against
the unpruned model, as in `eval`. Per budget: accuracy with a 95% Wilson interval, mean KL with a
95% normal interval, and the paired difference tuned - best preset (highest accuracy, ties by KL)
over the same questions, 95% normal intervals.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

Z = 1.959964


def wilson(hits: float, n: int) -> tuple[float, float]:
    p = hits / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / (1 + Z * Z / n)
    return centre - half, centre + half


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    n = len(values)
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / max(n - 1, 1))
    return m, m - Z * sd / math.sqrt(n), m + Z * sd / math.sqrt(n)


def _wait_for(path: Path) -> dict:
    """A tune output, waiting for it while the tuner still writes it (the reference runs meanwhile)."""
    while True:
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(10)


def main() -> None:
    import pruneware
    from pruneware.evals.datasets import load_benchmark
    from pruneware.plans.plan import Plan, PlanError
    from pruneware.plans.presets import get_preset
    from pruneware.tuning.calibration import Calibration

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tuned", action="append", required=True, type=Path, help="a `pruneware tune --json` output")
    parser.add_argument("--presets", default="divprune,fastv")
    parser.add_argument("--model", default="tiny-llava")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    model, processor = pruneware.load(args.model)
    items = load_benchmark("synthetic", limit=args.n, seed=args.seed)
    start = time.perf_counter()
    cal = Calibration(model, processor, items, batch_size=args.batch_size, seed=0)
    n_layers, n_visual, rope = cal.adapter.n_layers, cal.n_visual, cal.adapter.rope
    assert cal.ref_scores is not None and n_visual is not None
    out = {"model": args.model, "n": len(items), "seed": args.seed, "unpruned_accuracy": cal.reference_accuracy,
           "unpruned_acc_ci": wilson(sum(cal.ref_scores), len(items)), "budgets": []}
    print(f"unpruned accuracy {cal.reference_accuracy:.3f} on {len(items)} held-out questions")
    for path in args.tuned:
        tuned = _wait_for(path)
        budget = float(tuned["budget"].split("=")[1])
        plans = {"tuned": Plan.parse(tuned["plan"])}
        for name in args.presets.split(","):
            try:
                plans[name] = get_preset(name).build(n_layers, budget, n_visual, rope)
            except PlanError as err:
                print(f"  {name} at {budget:g}: skipped ({err})")
        rows = {}
        for name, plan in plans.items():
            kl, scores, reports = cal.per_question(plan)
            visual = [v for r in reports for v in r.visual_per_sample]
            rows[name] = {"plan": str(plan), "kl": kl.tolist(), "scores": scores,
                          "visual_tokens": sum(visual) / len(visual)}
        table = []
        for name, r in rows.items():
            acc = sum(r["scores"]) / len(r["scores"])
            kl_m, kl_lo, kl_hi = mean_ci(r["kl"])
            table.append({"name": name, "plan": r["plan"], "accuracy": acc, "acc_ci": wilson(sum(r["scores"]), len(items)),
                          "kl": kl_m, "kl_ci": (kl_lo, kl_hi), "visual_tokens": r["visual_tokens"]})
        presets = [t for t in table if t["name"] != "tuned"]
        best = max(presets, key=lambda t: (t["accuracy"], -t["kl"]))
        d_acc = mean_ci([a - b for a, b in zip(rows["tuned"]["scores"], rows[best["name"]]["scores"], strict=True)])
        d_kl = mean_ci([a - b for a, b in zip(rows["tuned"]["kl"], rows[best["name"]]["kl"], strict=True)])
        out["budgets"].append({"avg_tokens": budget, "table": table, "best_preset": best["name"],
                               "tuned_minus_best": {"accuracy": d_acc, "kl": d_kl}})
        print(f"\navg_tokens={budget:g}")
        for t in table:
            print(f"  {t['name']:9} {t['plan']:55} vis {t['visual_tokens']:6.1f}  acc {t['accuracy']:.3f} "
                  f"[{t['acc_ci'][0]:.3f}, {t['acc_ci'][1]:.3f}]  KL {t['kl']:.4f} [{t['kl_ci'][0]:.4f}, {t['kl_ci'][1]:.4f}]")
        print(f"  tuned - {best['name']}: accuracy {d_acc[0]:+.3f} [{d_acc[1]:+.3f}, {d_acc[2]:+.3f}], "
              f"KL {d_kl[0]:+.4f} [{d_kl[1]:+.4f}, {d_kl[2]:+.4f}] (paired)")
    out["time_s"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
