"""Score an embedded model (or a trained checkpoint folder) on a fresh synthetic eval split.

    python -m pruneware.models.evaluate --model tiny-llava --n 1000 --seed 0

Prints per-task accuracy as a markdown table and, with ``--json``, the full result.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pruneware.evals.synthetic import evaluate, make_split

from . import MODELS
from .loading import ModelLoadError, load_any


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-llava", help=f"one of {sorted(MODELS)} or a folder")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model, processor = load_any(args.model, device=device)
    except ModelLoadError as err:
        raise SystemExit(str(err)) from None
    t0 = time.time()
    res = evaluate(model, processor, make_split("eval", args.n, args.seed), args.batch_size)
    res["seconds"] = round(time.time() - t0, 1)
    print(f"{args.model}: eval split n={res['n']} seed={args.seed}, {res['seconds']} s\n")
    print("| task | n | accuracy |\n|---|---|---|")
    for t, acc in res["per_task"].items():
        print(f"| {t} | {res['counts'][t]} | {acc:.3f} |")
    print(f"| **overall** | {res['n']} | **{res['accuracy']:.3f}** |")
    if args.json:
        args.json.write_text(json.dumps({k: v for k, v in res.items() if k != "predictions"}, indent=1))
    return res


if __name__ == "__main__":
    main()
