"""Test the seed papers' claims on an embedded tiny model, at matched budgets, with paired 95% intervals.

    python benchmarks/findings.py runs/baselines-eval3/rows.jsonl runs/findings-deep/rows.jsonl

Reads the rows of one or more `pruneware eval --out` runs over the same questions (same model,
``--limit`` and ``--seed``; each run's ``run.json`` must hold the same weights fingerprint) and
prints one markdown row per comparison: both accuracies and the paired difference A - B with a
95% normal interval over questions (the same questions answered by both plans, so the interval
is much tighter than the two Wilson intervals side by side), plus the mean KL to the unpruned model.

Claims tested (what each paper's comparison is, rebuilt at one budget):
* Information Horizon: random pruning in deep layers is as good as scored pruning there. The
  ``info-horizon`` preset's solved plan against the same plan with its deep ``random`` stage
  replaced by ``fastv`` (scored by the last token's attention), at the same layer and keep count;
  the second plan has to be in the rows (run it explicitly, see benchmarks/RESULTS.md).
* AdaptInfer >= FastV at low budgets: ``adaptinfer`` against ``fastv`` at each budget both reach.
* Which policy is best before the LLM: the best ``@pre`` plan at each budget against the runner-up.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

PRE_PLANS = ("divprune", "random@pre", "fastervlm", "visionzip", "resize", "crosslmm")


def load_rows(paths: list[str]) -> dict[str, dict[str, dict]]:
    """``{variant: {question id: row}}`` over all files; refuses runs of different weights."""
    records = [Path(p).parent / "run.json" for p in paths]
    weights = {json.loads(r.read_text()).get("weights", "unrecorded") if r.is_file() else "unrecorded" for r in records}
    if len(paths) > 1 and (len(weights) != 1 or "unrecorded" in weights):
        raise SystemExit(f"the runs hold rows of different weights: {sorted(map(str, weights))}")
    out: dict[str, dict[str, dict]] = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.startswith("{") and line.endswith("}"):
                row = json.loads(line)
                out.setdefault(row["variant"], {})[row["id"]] = row
    return out


def paired(a: dict[str, dict], b: dict[str, dict]) -> dict:
    """Accuracies, KLs and the paired difference of accuracy (A - B) with its 95% interval."""
    ids = sorted(set(a) & set(b))
    d = [a[i]["score"] - b[i]["score"] for i in ids]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / max(n - 1, 1))
    half = 1.96 * sd / math.sqrt(n)
    acc = lambda rows: sum(rows[i]["score"] for i in ids) / n  # noqa: E731
    kl = lambda rows: None if any(rows[i].get("kl") is None for i in ids) else sum(rows[i]["kl"] for i in ids) / n  # noqa: E731
    return {"n": n, "a": acc(a), "b": acc(b), "diff": mean, "lo": mean - half, "hi": mean + half, "kl_a": kl(a), "kl_b": kl(b)}


def verdict(r: dict) -> str:
    if r["lo"] > 0:
        return "A better"
    if r["hi"] < 0:
        return "B better"
    return "no difference resolved"


def comparisons(rows: dict[str, dict[str, dict]]) -> list[tuple[str, str, str, str]]:
    """``(claim, budget, variant A, variant B)`` for every comparison the rows allow."""
    by_plan = {}
    for variant, answers in rows.items():
        by_plan.setdefault(next(iter(answers.values()))["plan"], variant)
    budgets = sorted({float(v.split("|")[1]) for v in rows if not v.endswith("|None")})
    out = []
    for b in budgets:
        ih = rows.get(f"info-horizon|{b}")
        if ih:
            solved = next(iter(ih.values()))["plan"]
            scored = by_plan.get(solved.replace("random@", "fastv@"))
            if scored:
                out.append(("Information Horizon: deep random ~ deep scored", f"{b:g}", f"info-horizon|{b}", scored))
        if f"adaptinfer|{b}" in rows and f"fastv|{b}" in rows:
            out.append(("AdaptInfer >= FastV", f"{b:g}", f"adaptinfer|{b}", f"fastv|{b}"))
        accuracy = lambda p: sum(r["score"] for r in rows[f"{p}|{b}"].values()) / len(rows[f"{p}|{b}"])  # noqa: E731
        pre = sorted((p for p in PRE_PLANS if f"{p}|{b}" in rows), key=accuracy, reverse=True)
        if len(pre) >= 2:
            out.append(("best before the LLM (vs runner-up)", f"{b:g}", f"{pre[0]}|{b}", f"{pre[1]}|{b}"))
    return out


def table(rows: dict[str, dict[str, dict]]) -> str:
    lines = [
        "| claim | avg tokens | A | B | n | acc A | acc B | A - B [95% CI] | KL A | KL B | reading |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for claim, budget, a, b in comparisons(rows):
        r = paired(rows[a], rows[b])
        name = lambda v: f"`{next(iter(rows[v].values()))['plan']}`"  # noqa: E731
        lines.append(
            f"| {claim} | {budget} | {a.split('|')[0]} {name(a)} | {name(b)} | {r['n']} | {r['a']:.3f} | {r['b']:.3f} "
            f"| {r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] | {r['kl_a']:.3f} | {r['kl_b']:.3f} | {verdict(r)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print(table(load_rows(sys.argv[1:])))
