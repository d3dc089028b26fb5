"""`pruneware bench`: prefill latency, peak memory and KV-cache bytes per plan and batch size.

`--shape llava-1.5-7b` (or qwen2.5-vl-7b) builds a random-weight model at that language-model
shape with a small vision tower, so nothing is downloaded; on a CPU use `--shape tiny`.
"""

from __future__ import annotations

import statistics
import time

import torch
import typer
from rich.console import Console
from rich.table import Table

import pruneware
from pruneware.evals.metrics import kv_cache_bytes
from pruneware.cli.common import (
    UserError, check_device, check_minimum, emit_json, load_model, parse_list, check_small_images, small_images_option, split_plans,
    user_errors,
)
from pruneware.plans import accepts_avg_tokens

SHAPES = {
    "llava-1.5-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32064),
    "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512),
}


def shape_model(shape: str, device: str):
    """A random-weight LLaVA at a named language-model shape, 576 image tokens, bf16 on GPU."""
    from transformers import LlavaForConditionalGeneration

    from pruneware.models.tiny_configs import tiny_config

    if shape not in SHAPES:
        raise UserError(f"unknown shape {shape!r}; valid shapes: {', '.join(SHAPES)}")
    text = {**SHAPES[shape], "max_position_embeddings": 4096}
    vision = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, image_size=336)
    config = tiny_config("llava", text=text, vision=vision, ids={"image": text["vocab_size"] - 1})
    config._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype).eval()
    return model


def shape_inputs(model, batch: int, device: str) -> dict:
    text_len = 64
    image = torch.full((batch, 576), model.config.image_token_id)
    ids = torch.cat([torch.randint(1, 100, (batch, 8)), image, torch.randint(1, 100, (batch, text_len - 8))], 1)
    dtype = next(model.parameters()).dtype
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": torch.randn(batch, 3, 336, 336, dtype=dtype, device=device)}


def _measure(model, inputs: dict, repeats: int) -> dict:
    cuda = inputs["input_ids"].is_cuda
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            out = model(**inputs, use_cache=True)
            if cuda:
                torch.cuda.synchronize()
            if i:  # the first run is a warm-up
                times.append((time.perf_counter() - start) * 1e3)
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.get("cache")
    kv_bytes = kv_cache_bytes(cache) if cache is not None else 0
    return {"prefill_ms": round(statistics.median(times), 3),
            "peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
            "kv_cache_mb": round(kv_bytes / 2**20, 3)}


@user_errors
def bench(
    model: str = typer.Option(None, help="Embedded name or local folder (ignored with --shape)."),
    shape: str = typer.Option(None, help=f"Random weights at a real shape: {', '.join(SHAPES)}."),
    plans: str = typer.Option("none,fastv,adaptinfer,divprune,info-horizon", help="Plans or presets."),
    avg_tokens: float = typer.Option(64, "--avg-tokens"),
    small_images: str = small_images_option(),
    batch_sizes: str = typer.Option("1,8", "--batch-sizes"),
    repeats: int = typer.Option(5),
    device: str = typer.Option(None),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Prefill latency, peak memory and KV-cache size per plan and batch size."""
    sizes = parse_list(batch_sizes, int, minimum=1, option="--batch-sizes")
    check_minimum("--repeats", [repeats], 1)
    check_minimum("--avg-tokens", [avg_tokens], 1)
    check_small_images(small_images)
    device = check_device(device)
    if shape is not None:
        vlm, name = shape_model(shape, device), f"random {shape}"
        make = lambda b: shape_inputs(vlm, b, device)  # noqa: E731
    else:
        from pruneware.cli.common import sample
        from PIL import Image

        from pruneware.evals.qwen_inputs import vision_inputs  # Qwen processors: through qwen-vl-utils

        vlm, processor, name = load_model(model, False, device)
        picture = Image.open(sample()["image"]).convert("RGB")
        question = sample()["question"]
        make = lambda b: vision_inputs(processor, [question] * b, [picture] * b).to(vlm.device)  # noqa: E731
    rows = []
    for batch in sizes:
        inputs = make(batch)
        for plan in split_plans(plans):
            if plan == "none":
                row = _measure(vlm, inputs, repeats)
                visual = float(sum(int((inputs["input_ids"][0] == vlm.config.image_token_id).sum()) for _ in [0]))
            else:
                budget = avg_tokens if accepts_avg_tokens(plan) else None  # a written budget runs as written
                with pruneware.prune(vlm, plan, avg_tokens=budget, small_images=small_images) as run:
                    row = _measure(vlm, inputs, repeats)
                visual = run.report.avg_visual_tokens
            ran = plan if plan == "none" else run.report.plan
            rows.append({"plan": plan, "ran": ran, "batch": batch, "avg_visual_tokens": round(visual, 1), **row})
    base = {r["batch"]: r["prefill_ms"] for r in rows if r["plan"] == "none"}
    for r in rows:
        r["speedup"] = round(base[r["batch"]] / r["prefill_ms"], 3) if r["batch"] in base else None
    if json_out:
        emit_json({"model": name, "device": device, "avg_tokens": avg_tokens, "results": rows})
        return
    table = Table(title=f"{name} on {device} (avg_tokens={avg_tokens:g})")
    for column in ("plan", "batch", "visual/layer", "prefill ms", "speedup", "peak MB", "KV MB"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["plan"], str(r["batch"]), f"{r['avg_visual_tokens']:.1f}", f"{r['prefill_ms']:.1f}",
                      "-" if r["speedup"] is None else f"{r['speedup']:.2f}", str(r["peak_mb"] or "-"), f"{r['kv_cache_mb']:.2f}")
    Console().print(table)
