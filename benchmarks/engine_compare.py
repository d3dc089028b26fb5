"""vLLM (with the plugin) against pruneware's HF path on the same questions: per plan, both
accuracies, the paired difference vLLM - HF with its 95% interval (``findings.paired``), and the
agreement (fraction of identical answers, raw and as scored), from two `pruneware eval --out` runs.

    pruneware eval --engine hf   --model tiny-llava --limit 300 --plans "none,divprune@pre:64" --out runs/hf
    pruneware eval --engine vllm --model tiny-llava --limit 300 --plans "none,divprune@pre:64" --out runs/vllm
    python benchmarks/engine_compare.py runs/hf/rows.jsonl runs/vllm/rows.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from findings import paired  # noqa: E402  (benchmarks/ is the script's folder, so on sys.path)

from pruneware.evals.synthetic.accuracy import normalize  # noqa: E402


def by_plan(path: str) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out.setdefault(row["requested"], {})[row["id"]] = row
    return out


def compare(hf_path: str, vllm_path: str) -> list[dict]:
    hf, vllm = by_plan(hf_path), by_plan(vllm_path)
    rows = []
    for plan in [p for p in vllm if p in hf]:
        r = paired(vllm[plan], hf[plan])
        ids = sorted(set(vllm[plan]) & set(hf[plan]))
        same = lambda f: sum(f(vllm[plan][i]["prediction"]) == f(hf[plan][i]["prediction"]) for i in ids) / len(ids)  # noqa: E731
        mean = lambda rows, k: sum(rows[i][k] for i in ids) / len(ids)  # noqa: E731
        rows.append({"plan": plan, "n": r["n"], "hf": r["b"], "vllm": r["a"], "diff": r["diff"], "lo": r["lo"], "hi": r["hi"],
                     "agreement": same(lambda x: x), "scored_agreement": same(normalize),
                     "hf_visual_tokens": mean(hf[plan], "visual_tokens"), "vllm_visual_tokens": mean(vllm[plan], "visual_tokens"),
                     "vllm_prompt_tokens": mean(vllm[plan], "prompt_tokens")})
    return rows


def table(rows: list[dict]) -> str:
    out = ["| plan | n | HF accuracy | vLLM accuracy | vLLM - HF [95% CI] | identical answers | identical as scored "
           "| visual tokens HF / vLLM | vLLM prompt tokens |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['plan']} | {r['n']} | {r['hf']:.3f} | {r['vllm']:.3f} | {r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] "
                   f"| {r['agreement']:.3f} | {r['scored_agreement']:.3f} | {r['hf_visual_tokens']:.0f} / {r['vllm_visual_tokens']:.0f} "
                   f"| {r['vllm_prompt_tokens']:.0f} |")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(table(compare(sys.argv[1], sys.argv[2])))
