"""GPU suite: prefill latency, TTFT, memory and kernel speed of pruneware at real 7B shapes.

    python benchmarks/gpu_suite.py --json gpu_suite.json      # one H200: under 6 minutes
    python benchmarks/gpu_suite.py --cpu --json cpu.json      # tiny shapes, for CI

Models are random-weight bf16, built from configs (nothing is downloaded). Each is the
full *ForConditionalGeneration model with a real-shape language model and a deliberately
small vision tower (2 layers, width 64): the LM shapes and token counts are real, the
vision tower's time is not. The ``-tower`` entries (GPU only) add the released towers' shapes
(CLIP ViT-L/14-336; Qwen2.5-VL-7B's 32-block tower) and time vision-side plans (``vitK``)
against a ``pre`` plan at the same kept count: how far past the pre-LLM ceiling cutting the tower gets.

* ``llava-1.5-7b``: LlavaForConditionalGeneration, Llama-2-7B LM, one 336 px image = 576 tokens.
* ``llava-next-7b-len``: the same model with five 336 px images = 2,880 image tokens, the
  length LLaVA-NeXT-7B's anyres gives (4 tiles + base image). Same LM, same positions.
* ``qwen2.5-vl-7b``: Qwen2_5_VLForConditionalGeneration, Qwen2-7B LM (GQA 28/4, M-RoPE),
  one 896x1176 image = 1,344 tokens.

Every prompt holds 64 text tokens. For batch 1 and 8 it measures, median of N after warm-up:

* ``ttft_ms``: host wall time from the forward call (use_cache, logits_to_keep=1) to the
  first token's id on the host; ``prefill_ms``: CUDA-event time of the language model's
  forward inside that call (pruneware's pre-LLM stage included);
* unpruned, then each preset at ``avg_tokens`` 64 and 192 (a preset that cannot reach a
  budget, or is not registered, is skipped and listed with the reason);
* the native lower bound of each pruned run: the same model, its own forward, with hooks
  that only take views: the LM input cut to the kept count for a pre-LLM stage, and layers
  K.. run on the kept count for an in-LLM stage at K (per-layer counts from the report);
  ``overhead = pruned / lower bound`` (target <= 1.05);
* a FastV-style peer: the model switched to eager attention and called with
  ``output_attentions=True`` (how FastV-style code gets attention weights), fastv plan;
* peak memory (``max_memory_allocated``) and KV-cache bytes of each run;
* kernels: copy bandwidth vs ``torch.gather`` vs the Triton gather (one launch for hidden,
  cos, sin and positions too), and the Triton score kernel vs its reference.

``--cpu`` runs the same code on tiny float32 models (8 layers, width 64; 64, 320 and 96 visual
tokens), budgets 16 and 48, batches 1 and 2, one iteration, the kernels interpreted when
``TRITON_INTERPRET=1``: it checks the code, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from transformers import LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pruneware  # noqa: E402
from pruneware.models.tiny_configs import tiny_config  # noqa: E402
from pruneware.plans import PlanError  # noqa: E402

PRESETS = ("fastv", "adaptinfer", "info-horizon", "crosslmm", "random", "divprune")
TEXT_TOKENS = 64
DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}  # CPU bf16 matmuls are slow and beside the point
LLAMA2_7B = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
QWEN2_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
TINY_LM = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
               bos_token_id=None, eos_token_id=None)
QWEN_IDS = dict(image=151655, video=151656, vision_start=151652, vision_end=151653)
TINY_QWEN_IDS = dict(image=250, video=251, vision_start=252, vision_end=253)


# models and inputs ----------------------------------------------------------------------------
def build_llava(cpu: bool, device: str) -> LlavaForConditionalGeneration:
    size = 112 if cpu else 336  # 64 or 576 tokens per image
    text = TINY_LM if cpu else LLAMA2_7B
    config = tiny_config("llava", text=text, vision=dict(hidden_size=64, intermediate_size=128, image_size=size),
                         ids={"image": text["vocab_size"] - 6})
    return _instantiate(LlavaForConditionalGeneration, config, device)


def build_qwen(cpu: bool, device: str) -> Qwen2_5_VLForConditionalGeneration:
    text = TINY_LM if cpu else QWEN2_7B  # the tiny one takes the default M-RoPE: theta 1e4, sections [2, 3, 3]
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, window_size=112, fullatt_block_indexes=[1])
    config = tiny_config("qwen2.5-vl", text=text, vision=vision, ids=TINY_QWEN_IDS if cpu else QWEN_IDS,
                         bos_token_id=None, eos_token_id=None)
    return _instantiate(Qwen2_5_VLForConditionalGeneration, config, device)


# The released towers' shapes (Qwen2.5-VL-7B's vision config; LLaVA-1.5's CLIP ViT-L/14 at 336 px).
QWEN25_TOWER = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31])
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336)


def build_llava_tower(cpu: bool, device: str) -> LlavaForConditionalGeneration:
    """LLaVA-1.5-7B's shapes with its real-size CLIP tower, read at layer -2 ([CLS] dropped)."""
    config = tiny_config("llava", text=LLAMA2_7B, vision=CLIP_L_336, ids={"image": LLAMA2_7B["vocab_size"] - 6},
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    return _instantiate(LlavaForConditionalGeneration, config, device)


def build_qwen_tower(cpu: bool, device: str) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL-7B's shapes with its real-size vision tower."""
    config = tiny_config("qwen2.5-vl", text=QWEN2_7B, vision=QWEN25_TOWER, ids=QWEN_IDS, bos_token_id=None,
                         eos_token_id=None)
    return _instantiate(Qwen2_5_VLForConditionalGeneration, config, device)


def _instantiate(cls, config, device: str):
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE[device])
    try:
        with torch.device(device):  # random init runs where the weights live
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=DTYPE[device]).eval()


def llava_inputs(model, batch: int, images: int, device: str) -> dict:
    vc, image_id = model.config.vision_config, model.config.image_token_id
    per = (vc.image_size // vc.patch_size) ** 2
    g = torch.Generator().manual_seed(0)
    text = torch.randint(10, 200, (batch, TEXT_TOKENS), generator=g)
    ids = torch.cat([text[:, :8], torch.full((batch, per * images), image_id), text[:, 8:]], dim=1)
    pixels = torch.randn(batch * images, 3, vc.image_size, vc.image_size, generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device),
            "pixel_values": pixels.to(device, DTYPE[device])}


def qwen_inputs(model, batch: int, grid: tuple[int, int], device: str) -> dict:
    cfg, vc = model.config, model.config.vision_config
    h, w = grid
    n_tok = h * w // vc.spatial_merge_size**2
    g = torch.Generator().manual_seed(0)
    text = torch.randint(10, 200, (batch, TEXT_TOKENS - 2), generator=g)
    visual = torch.tensor([cfg.vision_start_token_id] + [cfg.image_token_id] * n_tok + [cfg.vision_end_token_id])
    ids = torch.cat([text[:, :8], visual.expand(batch, -1), text[:, 8:]], dim=1)
    patch_dim = 3 * vc.temporal_patch_size * vc.patch_size**2
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
           "pixel_values": torch.randn(batch * h * w, patch_dim, generator=g).to(DTYPE[device]),
           "image_grid_thw": torch.tensor([[1, h, w]] * batch)}
    if "mm_token_type_ids" in inspect.signature(model.model.forward).parameters:
        out["mm_token_type_ids"] = (ids == cfg.image_token_id).int()
    return {k: v.to(device) for k, v in out.items()}


def model_specs(cpu: bool) -> list[dict]:
    """name, builder, inputs(model, batch, device), LM shape label."""
    grid = (16, 24) if cpu else (64, 84)  # patches before the 2x2 merge: 96 or 1,344 tokens
    return [
        dict(name="llava-1.5-7b", lm="Llama-2-7B", build=build_llava, inputs=lambda m, b, d: llava_inputs(m, b, 1, d),
             vision_plans=("random@vit1:0.25",) if cpu else ()),
        dict(name="llava-next-7b-len", lm="Llama-2-7B", build=build_llava,
             inputs=lambda m, b, d: llava_inputs(m, b, 5, d)),
        dict(name="qwen2.5-vl-7b", lm="Qwen2-7B", build=build_qwen, inputs=lambda m, b, d: qwen_inputs(m, b, grid, d),
             vision_plans=("random@vit1:0.25",) if cpu else ()),
    ] + ([] if cpu else [  # the real towers, for vision-side stages: TTFT past the pre-LLM ceiling
        dict(name="llava-1.5-7b-tower", lm="Llama-2-7B", build=build_llava_tower, presets=False,
             inputs=lambda m, b, d: llava_inputs(m, b, 1, d),
             vision_plans=("random@pre:0.25", "random@vit12:0.25", "fastervlm@vit12:0.25", "random@vit4:0.25")),
        dict(name="qwen2.5-vl-7b-tower", lm="Qwen2-7B", build=build_qwen_tower, presets=False,
             inputs=lambda m, b, d: qwen_inputs(m, b, grid, d),
             vision_plans=("random@pre:0.25", "random@vit16:0.25", "fastervlm@vit16:0.25", "random@vit4:0.25")),
    ])


# timing ----------------------------------------------------------------------------------------
class Clock:
    """Host wall time of a call, and device time of the language model inside it (hooks)."""

    def __init__(self, model, cuda: bool):
        self.cuda, self.marks = cuda, []
        lm = model.model.language_model
        # Prepended: the start mark precedes a pruneware pre-LLM stage (counted as prefill), the end
        # mark precedes pruneware's report hook (counted in TTFT only).
        self.handles = [lm.register_forward_pre_hook(lambda *a: self._mark(), prepend=True),
                        lm.register_forward_hook(lambda *a: self._mark(), prepend=True)]

    def _mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def lm_ms(self) -> float:
        start, end = self.marks[0], self.marks[-1]
        self.marks.clear()
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def first_token(model, inputs: dict, **extra) -> tuple[list[int], object]:
    out = model(**inputs, use_cache=True, logits_to_keep=1, **extra)
    return out.logits[:, -1].argmax(-1).tolist(), out  # .tolist() waits for the device


def measure(model, inputs: dict, args, cuda: bool, **extra) -> dict:
    """Median TTFT and LM prefill over args.iters calls after args.warmup; memory and KV of the last call."""
    clock = Clock(model, cuda)
    try:
        with torch.no_grad():
            for _ in range(args.warmup):
                first_token(model, inputs, **extra)
                clock.marks.clear()
            ttft, prefill, out = [], [], None
            for i in range(args.iters):
                del out
                if cuda:
                    torch.cuda.synchronize()
                    if i == args.iters - 1:
                        torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                _, out = first_token(model, inputs, **extra)
                ttft.append((time.perf_counter() - start) * 1e3)
                if cuda:
                    torch.cuda.synchronize()
                prefill.append(clock.lm_ms())
            peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss()
            kv = cache_bytes(out.get("cache", out.get("past_key_values")))
            del out
    finally:
        clock.remove()
    return {"ttft_ms": round(statistics.median(ttft), 3), "prefill_ms": round(statistics.median(prefill), 3),
            "ttft_all_ms": [round(t, 3) for t in ttft], "peak_mem_bytes": int(peak), "kv_cache_bytes": kv}


def cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# the native lower bound ----------------------------------------------------------------------------
@contextmanager
def kept_counts_only(model, counts: list[int], full: int):
    """Run the model's own forward with layer i on the last counts[i] tokens (views only, no gather).

    counts: tokens per decoder layer, non-increasing; counts[0] < full means a pre-LLM cut.
    """
    lm = model.model.language_model
    handles = []

    def cut(n):
        return lambda t: t if t is None or t.shape[-1] <= n else t[..., -n:]

    def lm_hook(module, args, kwargs):
        n = counts[0]
        kwargs["inputs_embeds"] = kwargs["inputs_embeds"][:, -n:]
        for key in ("attention_mask", "position_ids"):
            if isinstance(kwargs.get(key), torch.Tensor):
                kwargs[key] = cut(n)(kwargs[key])
        return args, kwargs

    def layer_hook(i):
        n, prev = counts[i], counts[i - 1] if i else counts[0]

        def hook(module, args, kwargs):
            if args and n < prev:
                args = (args[0][:, -n:], *args[1:])
            elif n < prev:
                kwargs["hidden_states"] = kwargs["hidden_states"][:, -n:]
            cos, sin = kwargs["position_embeddings"]
            kwargs["position_embeddings"] = (cos[..., -n:, :], sin[..., -n:, :])  # [(3,) B, L, d]
            if isinstance(kwargs.get("position_ids"), torch.Tensor):
                kwargs["position_ids"] = cut(n)(kwargs["position_ids"])
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 4:
                kwargs["attention_mask"] = mask[..., -n:, -n:]
            return args, kwargs

        return hook

    if counts[0] < full:
        handles.append(lm.register_forward_pre_hook(lm_hook, with_kwargs=True))
    for i, layer in enumerate(lm.layers):
        if counts[i] < counts[0]:
            handles.append(layer.register_forward_pre_hook(layer_hook(i), with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# the suite ------------------------------------------------------------------------------------
def run_model(model, spec: dict, record: dict, args, cuda: bool, budgets: list[int], skipped: list[str],
              deadline: float) -> None:
    """Fill record["batches"] for one model, one batch size at a time."""
    device = "cuda" if cuda else "cpu"
    n_layers = model.config.get_text_config().num_hidden_layers
    record["n_layers"] = n_layers
    for batch in args.batch:
        inputs = spec["inputs"](model, batch, device)
        n_visual = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
        record.update(n_visual=n_visual, seq_len=int(inputs["input_ids"].shape[1]))
        row = {"batch": batch, "unpruned": measure(model, inputs, args, cuda), "plans": [], "peer": []}
        record["batches"].append(row)
        base = row["unpruned"]["ttft_ms"]
        for preset in args.presets if spec.get("presets", True) else ():
            for avg in budgets:
                label = f"{spec['name']} B={batch} {preset}@{avg}"
                if preset not in pruneware.available_presets():
                    continue  # listed once in missing_presets
                if time.monotonic() > deadline:
                    skipped.append(f"{label}: time budget (--max-seconds) spent")
                    continue
                try:
                    result = run_plan(model, inputs, preset, avg, n_layers, args, cuda)
                    result["speedup_vs_unpruned"] = round(base / result["ttft_ms"], 3)
                    row["plans"].append(result)
                    if preset == "fastv" and time.monotonic() < deadline:
                        label += " (FastV-style peer)"
                        row["peer"].append(run_peer(model, inputs, avg, result, args, cuda))
                except PlanError as err:
                    skipped.append(f"{label}: {err}")
                except Exception as err:  # one failing run must not cost the rest of the suite
                    skipped.append(f"{label}: error: {type(err).__name__}: {str(err)[:300]}")
                    if cuda:
                        torch.cuda.empty_cache()
        for plan in spec.get("vision_plans", ()):  # vision-side stages: how far past the pre-LLM ceiling
            if time.monotonic() > deadline:
                skipped.append(f"{spec['name']} B={batch} {plan}: time budget (--max-seconds) spent")
                continue
            try:
                with pruneware.prune(model, plan, seed=0) as session:
                    result = measure(model, inputs, args, cuda)
                result.update(plan=plan, kept=session.report.stages[0].n_after[0],
                              speedup_vs_unpruned=round(base / result["ttft_ms"], 3))
                row.setdefault("vision_plans", []).append(result)
            except Exception as err:  # one failing run must not cost the rest of the suite
                skipped.append(f"{spec['name']} B={batch} {plan}: error: {type(err).__name__}: {str(err)[:300]}")
        del inputs


def run_plan(model, inputs: dict, preset: str, avg: int, n_layers: int, args, cuda: bool) -> dict:
    session = pruneware.prune(model, preset, avg_tokens=avg, seed=0)
    with session:
        pruned = measure(model, inputs, args, cuda)
    report = session.report
    full = int(inputs["input_ids"].shape[1])
    counts = [math.ceil(t - 1e-6) for t in report.tokens_per_layer]
    with kept_counts_only(model, counts, full):
        bound = measure(model, inputs, args, cuda)
    return {
        "preset": preset, "avg_tokens": avg, "plan": report.plan,
        "kept_per_stage": [s.n_after[0] for s in report.stages],
        "avg_visual_tokens": round(sum(report.visual_per_layer) / n_layers, 2),
        "tokens_per_layer": counts, **pruned,
        "lower_bound": {k: bound[k] for k in ("ttft_ms", "prefill_ms", "peak_mem_bytes", "kv_cache_bytes")},
        "overhead_ttft": round(pruned["ttft_ms"] / bound["ttft_ms"], 3),
        "overhead_prefill": round(pruned["prefill_ms"] / bound["prefill_ms"], 3),
    }


def run_peer(model, inputs: dict, avg: int, ours: dict, args, cuda: bool) -> dict:
    """FastV-style: eager attention everywhere, attention weights returned by output_attentions."""
    model.set_attn_implementation("eager")
    try:
        with pruneware.prune(model, "fastv", avg_tokens=avg, seed=0):
            peer = measure(model, inputs, args, cuda, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    return {"avg_tokens": avg, **{k: peer[k] for k in ("ttft_ms", "prefill_ms", "peak_mem_bytes", "kv_cache_bytes")},
            "peer_over_pruneware_ttft": round(peer["ttft_ms"] / ours["ttft_ms"], 3)}


# kernels --------------------------------------------------------------------------------------------
def time_ms(fn, cuda: bool, iters: int) -> float:
    """Median device time of fn() (CUDA events), or host time on CPU."""
    for _ in range(3 if cuda else 1):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def sig(x: float, digits: int = 4) -> float:
    """x to `digits` significant figures (interpreted CPU timings are tiny numbers, not zeros)."""
    return float(f"{x:.{digits}g}")


def kernel_benchmarks(device: str, cpu: bool) -> list[dict]:
    """Gather: copy vs torch.gather vs Triton (TB/s, read + write); scores: Triton vs reference (ms)."""
    from pruneware.kernels.gather import triton as fused_gather
    from pruneware.kernels.scores import reference as scores_ref
    from pruneware.kernels.scores import triton as fused_scores
    from pruneware.kernels.gather import reference as torch_gather

    cuda, iters = device == "cuda", (1 if cpu else 20)
    runs_triton = cuda or fused_gather._INTERPRETED
    out = []
    g = torch.Generator(device=device).manual_seed(0)
    shapes = [(2, 63, 65, 17)] if cpu else [(64, 4096, 4096, 1024), (8, 2944, 4096, 736), (1, 640, 4096, 160)]
    for B, L, D, k in shapes:
        hidden = torch.randn(B, L, D, device=device, generator=g, dtype=torch.bfloat16)
        index = torch.rand(B, L, device=device, generator=g).topk(k, dim=1).indices.sort(dim=1).values
        cos, sin = (torch.randn(1, L, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
        positions = torch.arange(L, device=device).expand(B, L)
        src, dst = torch.randn(B, k, D, device=device, dtype=torch.bfloat16), torch.empty(B, k, D, device=device,
                                                                                       dtype=torch.bfloat16)
        expanded = index[..., None].expand(B, k, D)
        rows = torch.arange(B, device=device)[:, None]
        tb = 2 * B * k * D * 2 / 1e12  # bytes read + written, in TB
        r = {"name": "gather", "B": B, "L": L, "D": D, "k": k, "dtype": "bfloat16",
             "copy_tbps": sig(tb / (time_ms(lambda: dst.copy_(src), cuda, iters) / 1e3)),
             "torch_gather_tbps": sig(tb / (time_ms(lambda: hidden.gather(1, expanded), cuda, iters) / 1e3)),
             "torch_index_tbps": sig(tb / (time_ms(lambda: hidden[rows, index], cuda, iters) / 1e3))}
        # The plain-torch path: one gather per tensor.
        r["set4_torch_us"] = sig(1e3 * time_ms(
            lambda: torch_gather.gather_rows(index, hidden, cos, sin, positions=positions), cuda, iters))
        if runs_triton:
            ms = time_ms(lambda: fused_gather.gather_rows(index, hidden), cuda, iters)
            r.update(triton_tbps=sig(tb / (ms / 1e3)), triton_over_copy=sig(tb / (ms / 1e3) / r["copy_tbps"]),
                     triton_over_torch_gather=sig(tb / (ms / 1e3) / r["torch_gather_tbps"]))
            r["set4_triton_us"] = sig(1e3 * time_ms(
                lambda: fused_gather.gather_rows(index, hidden, cos, sin, positions=positions), cuda, iters))
            r["set4_speedup"] = sig(r["set4_torch_us"] / r["set4_triton_us"])
        r["interpreted"] = not cuda
        out.append(r)
        hidden = src = dst = None  # free the device memory before the next shape (a del confuses pyflakes: the lambdas above use them)
    shapes = [(1, 4, 2, 4, 63, 16)] if cpu else [(8, 32, 32, 64, 2944, 128), (8, 28, 4, 1, 1408, 128)]
    for B, H, Hkv, T, L, d in shapes:
        q = torch.randn(B, T, H, d, device=device, generator=g, dtype=torch.bfloat16).transpose(1, 2)
        kk = torch.randn(B, L, Hkv, d, device=device, generator=g, dtype=torch.bfloat16).transpose(1, 2)
        w = torch.ones(B, T, device=device)
        pos = torch.arange(L - T, L, device=device).expand(B, T).contiguous()
        kw = dict(query_positions=pos, key_mask=torch.ones(B, L, dtype=torch.bool, device=device))
        r = {"name": "scores", "B": B, "H": H, "Hkv": Hkv, "T": T, "L": L, "d": d,
             "reference_ms": sig(time_ms(lambda: scores_ref.attention_scores(q, kk, w, **kw), cuda, iters))}
        if runs_triton:
            r["triton_ms"] = sig(time_ms(lambda: fused_scores.attention_scores(q, kk, w, **kw), cuda, iters))
            r["speedup"] = sig(r["reference_ms"] / r["triton_ms"])
        r["interpreted"] = not cuda
        out.append(r)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (CI)")
    parser.add_argument("--json", default="gpu_suite.json")
    parser.add_argument("--batch", type=int, nargs="+", default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--models", nargs="+", default=None, help="subset of model names")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), help="presets to time (default: PRESETS)")
    parser.add_argument("--max-seconds", type=float, default=None, help="skip what is left after this")
    args = parser.parse_args()
    cuda = not args.cpu
    if cuda and not torch.cuda.is_available():
        parser.error("no CUDA device: use --cpu for the tiny CPU run")
    device = "cuda" if cuda else "cpu"
    if args.cpu:
        torch.set_num_threads(1)  # tiny ops: threads only add contention on a shared CI box
    args.batch = args.batch or ([1, 2] if args.cpu else [1, 8])
    args.iters = args.iters or (1 if args.cpu else 7)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.cpu else 2)
    max_seconds = args.max_seconds or (240 if args.cpu else 300)
    t0 = time.monotonic()
    try:
        kernels = kernel_benchmarks(device, cpu=args.cpu)  # first: short, and what the kernel targets need
    except Exception as err:  # a kernel that fails to build must not cost the model runs
        kernels = [{"name": "error", "error": f"{type(err).__name__}: {str(err)[:500]}"}]
        if cuda:
            torch.cuda.empty_cache()
    specs = [s for s in model_specs(args.cpu) if not args.models or s["name"] in args.models]
    skipped: list[str] = []
    missing = [p for p in args.presets if p not in pruneware.available_presets()]
    records, built = [], (None, None)
    budgets = [64, 192] if cuda else [16, 48]  # the CPU models have 64-320 visual tokens, not 576-2,880
    for i, spec in enumerate(specs):
        record = {"name": spec["name"], "lm_shape": spec["lm"], "batches": []}
        records.append(record)
        share = (t0 + max_seconds - time.monotonic()) / (len(specs) - i)  # each model gets its share of what is left
        try:
            if built[0] is not spec["build"]:  # the two LLaVA entries share one model
                built = (None, None)
                if cuda:
                    torch.cuda.empty_cache()
                built = (spec["build"], spec["build"](args.cpu, device))
            run_model(built[1], spec, record, args, cuda, budgets, skipped, time.monotonic() + share)
        except Exception as err:  # e.g. out of memory: keep the other models
            skipped.append(f"{spec['name']}: error: {type(err).__name__}: {str(err)[:300]}")
    built = (None, None)
    result = {"meta": meta(args, device, time.monotonic() - t0), "models": records, "kernels": kernels,
              "missing_presets": missing, "skipped": skipped}
    Path(args.json).write_text(json.dumps(result, indent=1))
    print_summary(result)


def meta(args, device: str, seconds: float) -> dict:
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "mode": "cpu" if args.cpu else "gpu",
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "transformers": transformers.__version__, "triton": triton.__version__, "pruneware": pruneware.__version__,
        "commit": commit, "iters": args.iters, "warmup": args.warmup, "batches": args.batch,
        "seconds": round(seconds, 1), "dtype": str(DTYPE[device]).removeprefix("torch."), "attn": "sdpa",
        "vision": "full model class with a small random vision tower (2 layers, width 64); real-shape LM",
        "peak_mem_source": "torch.cuda.max_memory_allocated per run" if device == "cuda"
        else "process peak RSS (ru_maxrss), not per run",
        "kernels_env": os.environ.get("PRUNEWARE_KERNELS", "auto"),
    }


def print_summary(result: dict) -> None:
    m = result["meta"]
    print(f"\npruneware GPU suite  {m['date']}  {m['gpu'] or m['cpu']}  torch {m['torch']}  "
          f"transformers {m['transformers']}  triton {m['triton']}  {m['dtype']}  ({m['seconds']} s)")
    print(f"models: {m['vision']}")
    reasons: dict[str, list[str]] = {}
    for s in result["skipped"]:
        label, _, why = s.partition(": ")
        if why.startswith("error"):
            print(f"FAILED {s}")
            continue
        reasons.setdefault("time budget" if "time budget" in why else "budget out of reach", []).append(label)
    for why, labels in reasons.items():
        print(f"skipped ({why}, details in the JSON): {len(labels)} runs, e.g. {labels[0]}")
    if result["missing_presets"]:
        print(f"presets not registered (skipped): {', '.join(result['missing_presets'])}")
    for k in result["kernels"]:
        if k["name"] == "error":
            print(f"FAILED kernel benchmarks: {k['error']}")
        elif k["name"] == "gather":
            print(f"gather B={k['B']} L={k['L']} D={k['D']} k={k['k']}: copy {k['copy_tbps']} TB/s, torch.gather "
                  f"{k['torch_gather_tbps']}, triton {k.get('triton_tbps')} ({k.get('triton_over_copy')} of copy, "
                  f"{k.get('triton_over_torch_gather')}x gather); hidden+cos+sin+pos: torch {k['set4_torch_us']} us, "
                  f"triton {k.get('set4_triton_us')} us")
        else:
            print(f"scores B={k['B']} H={k['H']}/{k['Hkv']} T={k['T']} L={k['L']}: reference {k['reference_ms']} ms, "
                  f"triton {k.get('triton_ms')} ms ({k.get('speedup')}x)")
    print("\nTTFT ms (LM prefill ms) | pruned/lower bound | speedup vs unpruned; peer = FastV-style eager / ours")
    for rec in result["models"]:
        if not rec["batches"]:
            continue
        budgets = sorted({p["avg_tokens"] for row in rec["batches"] for p in row["plans"]})
        head = "".join(f" | {'@' + str(b):>28}" for b in budgets)
        print(f"\n{rec['name']} ({rec['lm_shape']}, {rec['n_visual']} visual of {rec['seq_len']} tokens){head}")
        for row in rec["batches"]:
            u = row["unpruned"]
            print(f"  B={row['batch']:<2} unpruned {u['ttft_ms']:8.1f} ({u['prefill_ms']:.1f}) "
                  f"peak {u['peak_mem_bytes'] / 2**30:.1f} GiB, KV {u['kv_cache_bytes'] / 2**20:.0f} MiB")
            by = {(p["preset"], p["avg_tokens"]): p for p in row["plans"]}
            by.update({("peer", p["avg_tokens"]): p for p in row["peer"]})
            for preset in [*dict.fromkeys(p["preset"] for p in row["plans"]), "peer"]:
                cells = []
                for b in budgets:
                    p = by.get((preset, b))
                    if p is None:
                        cells.append(f"{'-':>28}")
                    elif preset == "peer":
                        cells.append(f"{p['ttft_ms']:8.1f} {'':9} peer {p['peer_over_pruneware_ttft']:5.2f}x")
                    else:
                        cells.append(f"{p['ttft_ms']:8.1f} ({p['prefill_ms']:6.1f}) {p['overhead_ttft']:5.2f} "
                                     f"{p['speedup_vs_unpruned']:4.2f}x")
                if any(c.strip() != "-" for c in cells):
                    print(f"       {preset:<16}" + "".join(f" | {c}" for c in cells))


if __name__ == "__main__":
    main()
