"""`pruneware eval`: sweep plans x budgets over a benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from pruneware.cli.common import (
    UserError, check_minimum, check_out_folder, emit_json, load_model, parse_list, check_small_images, small_images_option, split_plans,
    user_errors,
)


def _items(bench: str, data: str | None, limit: int | None, seed: int) -> list:
    from pruneware.evals.datasets import load_benchmark

    if limit is not None:
        check_minimum("--limit", [limit], 1)
    if bench == "synthetic" and limit is None:
        limit = 200
    items = list(load_benchmark(bench, path=data, limit=limit, seed=seed))
    if not items:
        raise UserError(f"benchmark {bench!r}{f' at {data}' if data else ''} holds no examples")
    return items


def claim_out_folder(folder: Path, run: dict) -> None:
    """Rows in an ``--out`` folder are keyed by plan and question, not by model or dataset, so a
    folder resumes only the run that wrote it: record that run (model, dataset, and a fingerprint
    of the weights, so new weights saved under the same name count as another run) in
    ``run.json``, refuse another."""
    record = folder / "run.json"
    if record.is_file():
        old = json.loads(record.read_text())
        if old != run:
            held = ", ".join(f"{k}={v}" for k, v in old.items())
            raise UserError(f"--out {folder} holds rows of another run ({held}); use another --out or remove that folder")
    folder.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(run))


@user_errors
def evaluate(
    model: str = typer.Option(None, help="Embedded name, local folder, or hub id (with --download)."),
    bench: str = typer.Option("synthetic", help="synthetic, jsonl, textvqa, pope, gqa or mme."),
    data: str = typer.Option(None, help="Local file or folder for jsonl and the public benchmarks."),
    plans: str = typer.Option("none,fastv,adaptinfer,divprune,random,info-horizon,crosslmm",
                              help="Plans or presets, ','-separated (';' if a plan has several stages; one complete multi-stage plan, such as `tune` prints, needs none)."),
    avg_tokens: str = typer.Option(None, "--avg-tokens", help="Budgets for presets: average visual tokens per layer (explicit plans run once at their own). Default 64,128,192; hf engine only."),
    small_images: str = small_images_option(),
    limit: int = typer.Option(None, help="Examples (synthetic default: 200)."),
    seed: int = typer.Option(0, help="Seed: a fresh synthetic split, and random policies."),
    batch_size: int = typer.Option(8, "--batch-size"),
    out: str = typer.Option("runs/eval", help="Output folder: rows.jsonl (resumable), results.json, plots."),
    download: bool = typer.Option(False),
    json_out: bool = typer.Option(False, "--json", help="stdout is one JSON object with a `results` list."),
    engine: str = typer.Option("hf", help="hf (pruneware's HF wrapper) or vllm (a vLLM engine with the plugin; `pre` plans only)."),
) -> None:
    """Sweep plans and budgets over a benchmark: accuracy, fidelity, tokens, FLOPs, latency."""
    from pruneware.evals.plots import plot_sweep
    from pruneware.evals.runner import run_sweep, summarize, variants

    if engine not in ("hf", "vllm"):
        raise UserError(f"--engine must be hf or vllm, got {engine!r}")
    check_minimum("--batch-size", [batch_size], 1)
    check_small_images(small_images)
    out_dir = check_out_folder(out)
    if engine == "vllm" and small_images != "error":
        raise UserError("--small-images applies to --avg-tokens, which --engine vllm does not take")
    plan_list = split_plans(plans)
    if engine == "vllm" and avg_tokens is not None:
        raise UserError("--avg-tokens is not supported with --engine vllm (the plugin keeps a fixed count per image): "
                        "write the budget into the plan, e.g. divprune@pre:64 or random@pre:0.25")
    budgets = parse_list(avg_tokens or "64,128,192", float, minimum=1, option="--avg-tokens")
    items = _items(bench, data, limit, seed)  # a bad dataset fails before the model loads
    if engine == "vllm":
        from pruneware.cli.common import DEFAULT_MODEL
        from pruneware.evals.vllm_engine import check_plans, files_fingerprint, run_sweep_vllm, stdout_to_stderr

        name = model or DEFAULT_MODEL
        weights = files_fingerprint(check_plans(name, plan_list, seed))  # the plugin's PlanError, before any engine
        sweep = variants(plan_list, [])
        claim_out_folder(out_dir, {"model": name, "weights": weights, "bench": bench, "data": data, "engine": engine})
    else:
        vlm, processor, name = load_model(model, download)
        import pruneware
        from pruneware.models.loading import weights_fingerprint

        for plan in plan_list:  # fail on a malformed plan before any work (budgets are checked per input)
            if plan != "none":
                pruneware.prune(vlm, plan)
        sweep = variants(plan_list, budgets)
        weights = weights_fingerprint(vlm)
        keep_small = {"small_images": small_images} if small_images != "error" else {}  # older folders resume
        claim_out_folder(out_dir, {"model": name, "weights": weights, "bench": bench, "data": data, **keep_small})
    console = Console(stderr=True)
    columns = (TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=json_out) as progress:
        task = progress.add_task("eval", total=len(sweep) * len(items))

        def on_progress(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        skipped: dict[str, str] = {}
        if engine == "vllm":
            with stdout_to_stderr():  # vLLM's logs would break `--json`
                rows = run_sweep_vllm(name, items, sweep, out_dir / "rows.jsonl", seed, bench=bench, on_progress=on_progress)
        else:
            rows = run_sweep(vlm, processor, items, sweep, out_dir / "rows.jsonl", batch_size, seed,
                             bench=bench, on_progress=on_progress, skipped=skipped, small_images=small_images)
    ids = {str(it.id) for it in items}
    results = summarize([r for r in rows if r["id"] in ids], sweep, items, bench)
    payload = {"model": name, "weights": weights, "bench": bench, "n_examples": len(items), "seed": seed, "engine": engine,
               "results": results, "skipped": skipped}
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1))
    payload["plots"] = [str(p) for p in plot_sweep(results, out_dir)]
    if json_out:
        emit_json(payload)
        return
    table = Table(title=f"{name} on {bench} ({len(items)} examples, {engine})")
    for column in ("plan", "avg tokens", "accuracy", "relative", "visual/layer", "prompt tokens", "LM GFLOPs",
                   "vision GFLOPs", "prefill ms", "KL", "answer agreement"):
        table.add_column(column, justify="right")

    def cell(value: float | None, fmt: str, scale: float = 1.0) -> str:
        return "-" if value is None else format(value / scale, fmt)

    for r in results:
        table.add_row(r["plan"], cell(r["avg_tokens"], "g"), f"{r['accuracy']:.3f}", cell(r["relative_accuracy"], ".3f"),
                      cell(r["avg_visual_tokens"], ".1f"), cell(r["avg_prompt_tokens"], ".1f"), cell(r["flops"], ".3f", 1e9),
                      cell(r["vision_flops"], ".3f", 1e9), cell(r["prefill_ms"], ".1f"), cell(r["kl"], ".4f"),
                      cell(r["answer_agreement"], ".3f"))
    Console().print(table)
    for key, reason in skipped.items():
        Console(stderr=True).print(f"skipped {key.replace('|', ' at avg_tokens=')}: {reason}")
    Console().print(f"wrote {out_dir / 'results.json'}, {out_dir / 'rows.jsonl'} and plots: {', '.join(payload['plots'])}")
