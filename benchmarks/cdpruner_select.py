"""CDPruner's greedy DPP MAP alone: the official loop, the plain-torch reference and the dispatched
fast path, side by side; DivPrune's fast path at the same shape for scale.

On CPU the fast path is the numpy loop (pruneware/kernels/cdpruner/cpu.py); on CUDA it is the
one-launch Triton kernel. They run interleaved round by round on random features (576 tokens per
image, LLaVA-1.5's count) and must select the same tokens as the reference. Times are the thread's
CPU time on CPU tensors (`--threads 1` by default, for shared machines), wall time on CUDA.

    python benchmarks/cdpruner_select.py [--rounds 10] [--dim 96 4096] [--keep 64 128] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from pruneware.kernels.cdpruner import conditional_dpp, reference
from pruneware.kernels.divprune import max_min_diverse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.official
from tests.official import official_cdpruner  # noqa: E402


def timed(fn, device: str) -> float:
    clock = time.perf_counter if device == "cuda" else time.thread_time
    if device == "cuda":
        torch.cuda.synchronize()
    start = clock()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=576)
    parser.add_argument("--dim", type=int, nargs="+", default=[96, 4096])
    parser.add_argument("--keep", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| tokens | dim | keep | official loop ms | reference ms | fast path ms | fast / official | divprune fast ms |")
    print("|---|---|---|---|---|---|---|---|")
    for dim in args.dim:
        for k in args.keep:
            gen = torch.Generator().manual_seed(dim + k)
            x = torch.randn(1, args.tokens, dim, generator=gen).to(args.device)
            text = torch.randn(5, dim, generator=gen).to(args.device)
            unit = torch.nn.functional.normalize
            rel = -(unit(x[0], dim=-1) @ unit(text, dim=-1).T).mean(dim=-1)
            rel = ((rel - rel.min() + 1e-6) / (rel.max() - rel.min()))[None]
            assert torch.equal(conditional_dpp(x, rel, k), reference.conditional_dpp(x, rel, k))
            times: dict[str, list[float]] = {"official": [], "reference": [], "fast": [], "divprune": []}
            for _ in range(args.rounds):
                times["official"].append(timed(lambda: official_cdpruner(x, x, text, k), args.device))
                times["reference"].append(timed(lambda: reference.conditional_dpp(x, rel, k), args.device))
                times["fast"].append(timed(lambda: conditional_dpp(x, rel, k), args.device))
                times["divprune"].append(timed(lambda: max_min_diverse(x, k), args.device))
            ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
            print(f"| {args.tokens} | {dim} | {k} | {ms['official']:.2f} | {ms['reference']:.2f} | {ms['fast']:.2f} | "
                  f"{ms['fast'] / ms['official']:.2f}x | {ms['divprune']:.2f} |")


if __name__ == "__main__":
    main()
