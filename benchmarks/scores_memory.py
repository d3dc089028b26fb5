"""Peak memory of the score step: fused Triton kernel vs plain-torch reference.

The score step (``pruneware.kernels.scores.attention_scores``) turns the
attention of T chosen query rows into one score per key. The reference holds
``[B, H, T, L]`` fp32 logits and probabilities; the fused kernel keeps only a
``[B, R, L]`` fp32 partial-score buffer (R = key heads x row blocks).

Memory is counted above the inputs (q, k, weights, positions, mask).

* CUDA: both backends are **measured** with ``torch.cuda.max_memory_allocated``.
* CPU: the fused kernel cannot run natively (the Triton interpreter copies every
  tensor, so its memory means nothing), so its bytes are **analytic**: exactly
  the buffers its host function allocates. The reference is **measured** with
  the torch profiler's memory timeline, next to the analytic size of its two
  ``[B, H, T, L]`` fp32 tensors.

    python benchmarks/scores_memory.py            # L=2944, T=64, H=32, d=128, bf16
    python benchmarks/scores_memory.py --Hkv 8    # a GQA model
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pruneware.kernels.scores import reference  # noqa: E402

MIB = 2**20


def make_inputs(B: int, H: int, Hkv: int, T: int, L: int, d: int, dtype: torch.dtype, device: str):
    """Inputs in the layout HF attention hands over: [B, heads, len, d] views of [B, len, heads, d]."""
    q = torch.randn(B, T, H, d, device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(B, L, Hkv, d, device=device, dtype=dtype).transpose(1, 2)
    weights = torch.ones(B, T, device=device)
    positions = torch.arange(L - T, L, device=device).expand(B, T).contiguous()  # text at the end
    key_mask = torch.ones(B, L, dtype=torch.bool, device=device)
    return dict(q=q, k=k, weights=weights, query_positions=positions, key_mask=key_mask)


def input_bytes(inputs: dict) -> int:
    return sum(t.numel() * t.element_size() for t in inputs.values())


def fused_analytic(B: int, H: int, Hkv: int, T: int, L: int, d: int, query_block: bool) -> int:
    """Bytes the Triton host function allocates: partial scores, s, and the qq extras."""
    from pruneware.kernels.scores.triton import workspace_rows

    total = B * workspace_rows(H, Hkv, T, d) * L * 4 + B * L * 4
    if query_block:
        total += 2 * B * H * T * 4 + B * T * T * 4  # row max and 1/denominator, qq
    return total


def reference_analytic(B: int, H: int, T: int, L: int) -> int:
    """The reference's two [B, H, T, L] fp32 tensors (logits and probabilities), alive together."""
    return 2 * B * H * T * L * 4


def cuda_peak(fn) -> int:
    fn()  # warm-up: compiles the kernel
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    del out
    return torch.cuda.max_memory_allocated() - base


def cpu_profiled_peak(fn, inputs: dict) -> int:
    """Peak of the profiler's CPU memory timeline, minus the inputs it also counts."""
    from torch.profiler import ProfilerActivity, profile

    options = dict(profile_memory=True, record_shapes=True, with_stack=True)
    with profile(activities=[ProfilerActivity.CPU], **options) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = os.path.join(tmp, "timeline.json")
        prof.export_memory_timeline(path, device="cpu")
        _, sizes = json.loads(Path(path).read_text())
    return max(map(sum, sizes)) - input_bytes(inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in dict(B=1, H=32, Hkv=32, T=64, L=2944, d=128).items():
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    B, H, Hkv, T, L, d = args.B, args.H, args.Hkv, args.T, args.L, args.d
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    inputs = make_inputs(B, H, Hkv, T, L, d, dtype, device)

    print(f"score step, B={B} H={H} Hkv={Hkv} T={T} L={L} d={d} {args.dtype}, device={device}")
    print(f"inputs: {input_bytes(inputs) / MIB:.2f} MiB (not counted below)")
    rows = []
    for query_block in (False, True):
        label = "s + qq (AdaptInfer)" if query_block else "s only (FastV)"
        run_ref = lambda: reference.attention_scores(**inputs, return_query_block=query_block)  # noqa: E731
        ref_analytic = reference_analytic(B, H, T, L)
        fused = fused_analytic(B, H, Hkv, T, L, d, query_block)
        if cuda:
            from pruneware.kernels.scores.triton import attention_scores as fused_scores

            run_fused = lambda: fused_scores(**inputs, return_query_block=query_block)  # noqa: E731
            ref_measured, ref_how = cuda_peak(run_ref), "measured (cuda max_memory_allocated)"
            fused_measured, fused_how = cuda_peak(run_fused), "measured (cuda max_memory_allocated)"
        else:
            ref_measured, ref_how = cpu_profiled_peak(run_ref, inputs), "measured (CPU, torch.profiler)"
            fused_measured, fused_how = fused, "analytic (host allocations)"
        rows.append((label, "reference", ref_measured, ref_how))
        rows.append((label, "fused", fused_measured, fused_how))
        rows.append((label, "ratio ref/fused", ref_measured / fused_measured, ""))
        print(f"  [{label}] analytic: reference [B,H,T,L] logits+probs {ref_analytic / MIB:.2f} MiB, "
              f"fused buffers {fused / MIB:.3f} MiB")

    print(f"\n{'step':<22}{'backend':<17}{'peak above inputs':>18}  how")
    for label, backend, value, how in rows:
        shown = f"{value:.0f}x" if how == "" else f"{value / MIB:.3f} MiB"
        print(f"{label:<22}{backend:<17}{shown:>18}  {how}")
    print(f"\ntorch {torch.__version__}, {torch.cuda.get_device_name() if cuda else 'CPU only'}")


if __name__ == "__main__":
    main()
