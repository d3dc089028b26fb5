"""CrossLMM on an embedded tiny model: training-free vs trained vs plain pooling vs DivPrune.

At the same number of visual tokens per image (e.g. 16 and 64 of 576), trains a V2V compressor by
distillation on the synthetic train split, then evaluates every variant on a fresh eval split:
accuracy, and the KL of the next-token distribution against the unpruned model. Every variant
answers the same questions, so each is also compared with trained CrossLMM question by question:
the paired difference of accuracy with its 95% interval (``benchmarks/findings.py``'s ``paired``).

    python benchmarks/crosslmm_compare.py --model tiny-llava --budgets 16 64 --steps 150 --n 200
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from findings import load_rows, paired  # benchmarks/ is the script's folder, so on sys.path

from pruneware.evals.runner import Variant, run_sweep, summarize
from pruneware.evals.synthetic import make_split
from pruneware.policies.crosslmm.compressor import save_compressor
from pruneware.tuning.crosslmm import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llava")
    parser.add_argument("--budgets", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from pruneware.cli.common import load_model

    model, processor, name = load_model(args.model)
    items = make_split("eval", args.n, seed=args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for budget in args.budgets:
            start = time.time()
            compressor, curve = train(model, processor, budget, args.steps, 8, 3e-3, args.seed, log=lambda s: None)
            folder = save_compressor(compressor, Path(tmp) / f"b{budget}")
            plans = {
                "crosslmm (training-free)": f"crosslmm@pre:{budget}",
                "crosslmm (trained)": f"crosslmm[compressor={folder}]@pre:{budget}",
                "average pooling": f"crosslmm[gate=0.0]@pre:{budget}",
                "divprune": f"divprune@pre:{budget}",
            }
            variants = [Variant("none", None)] + [Variant(p, None) for p in plans.values()]
            out = Path(tmp) / f"rows{budget}.jsonl"
            results = summarize(run_sweep(model, processor, items, variants, out, batch_size=8, seed=args.seed),
                                variants)
            label = {v: k for k, v in plans.items()} | {"none": "unpruned"}
            answers = {label[v.split("|")[0]]: by_id for v, by_id in load_rows([str(out)]).items()}
            for r in results:
                variant = label[r["plan"]]
                vs = paired(answers["crosslmm (trained)"], answers[variant])
                rows.append({"budget": budget, "variant": variant, "accuracy": r["accuracy"],
                             "kl": r["kl"], "top1_agreement": r["top1_agreement"],
                             "trained_minus_this": [round(vs[k], 4) for k in ("diff", "lo", "hi")],
                             "train_s": round(time.time() - start, 1), "final_train_kl": curve[-1]["kl"]})
    print(f"{name}, {args.n} eval questions (seed {args.seed}), adapter: {args.steps} steps")
    print(f"{'budget':>6}  {'variant':26} {'accuracy':>8} {'KL':>8} {'top-1':>6}  trained - this [95% CI]")
    for r in rows:
        d, lo, hi = r["trained_minus_this"]
        print(f"{r['budget']:>6}  {r['variant']:26} {r['accuracy']:>8.3f} {r['kl']:>8.4f} {r['top1_agreement']:>6.3f}"
              f"  {d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": name, "args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
