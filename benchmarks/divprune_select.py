"""DivPrune's greedy selection alone: the plain-torch reference against the dispatched fast path.

On CPU the fast path is the numpy loop (pruneware/kernels/divprune/cpu.py); on CUDA it is the
one-launch Triton kernel. Both run side by side, interleaved round by round, on random features
of LLaVA-1.5's shape (576 tokens per image), and must select the same tokens.

`--clock cpu` times the thread's CPU time (CPU tensors, `--threads 1`), for shared machines.

    python benchmarks/divprune_select.py [--rounds 20] [--groups 1 4] [--dim 256] [--device cpu] [--clock cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pruneware.kernels.divprune import max_min_diverse, reference


CLOCK = time.perf_counter


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = CLOCK()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (CLOCK() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--tokens", type=int, default=576)
    parser.add_argument("--keep", type=int, default=144)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args()
    global CLOCK
    if args.clock == "cpu":
        if args.device != "cpu":
            parser.error("--clock cpu times CPU tensors only; use --device cpu")
        CLOCK = time.thread_time
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {args.device}, N={args.tokens}, k={args.keep}, D={args.dim}, threads {torch.get_num_threads()}, "
          f"clock {args.clock}")
    print(f"{'G':>3} {'reference ms':>13} {'fast ms':>8} {'speedup':>8}")
    for g in args.groups:
        x = torch.randn(g, args.tokens, args.dim, generator=torch.Generator().manual_seed(g)).to(args.device)
        assert torch.equal(max_min_diverse(x, args.keep), reference.max_min_diverse(x, args.keep))
        times: dict[str, list[float]] = {"reference": [], "fast": []}
        for _ in range(args.rounds):
            times["reference"].append(timed(lambda: reference.max_min_diverse(x, args.keep), args.device))
            times["fast"].append(timed(lambda: max_min_diverse(x, args.keep), args.device))
        ref, fast = statistics.median(times["reference"]), statistics.median(times["fast"])
        print(f"{g:>3} {ref:>13.2f} {fast:>8.2f} {ref / fast:>7.1f}x")


if __name__ == "__main__":
    main()
