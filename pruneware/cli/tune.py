"""`pruneware tune`: the plan that loses least for a model under a budget."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pruneware.cli.common import UserError, emit_json, load_model, user_errors


def _budget(avg_tokens: float | None, flops_ratio: float | None, latency_ms: float | None) -> dict:
    given = {k: v for k, v in (("avg_tokens", avg_tokens), ("flops_ratio", flops_ratio), ("latency_ms", latency_ms))
             if v is not None}
    if len(given) != 1:
        raise UserError(
            f"give exactly one budget: --avg-tokens N, --flops-ratio r or --latency-ms t (got {len(given)})"
        )
    return given


def _calibration(bench: str, data: str | None, calib: int, seed: int) -> list:
    """Synthetic *train* questions, or the questions of a dataset `pruneware eval` reads."""
    from pruneware.evals.datasets import load_benchmark
    from pruneware.tuning.calibration import default_calibration

    if bench == "synthetic":
        if data is not None:
            raise UserError("the synthetic benchmark is generated and takes no --data (it tunes on its train split)")
        return default_calibration(calib, seed)
    return list(load_benchmark(bench, path=data, limit=calib, seed=seed))


@user_errors
def tune(
    model: str = typer.Option(None, help="Embedded name, local folder, or hub id (with --download)."),
    avg_tokens: float = typer.Option(None, "--avg-tokens", help="Budget: average visual tokens per decoder layer."),
    flops_ratio: float = typer.Option(None, "--flops-ratio", help="Budget: LM prefill FLOPs relative to unpruned, in (0, 1]."),
    latency_ms: float = typer.Option(None, "--latency-ms", help="Budget: batch-1 prefill ms on this machine (fitted cost model)."),
    vision_flops_ratio: float = typer.Option(
        None, "--vision-flops-ratio",
        help="Also keep the vision encoder's FLOPs at or below this share of unpruned, in (0, 1]: searches pre-vit and vitK stages too."),
    bench: str = typer.Option("synthetic", help="Calibration data: synthetic (its train split), jsonl, textvqa, pope, gqa or mme."),
    data: str = typer.Option(None, help="Local file or folder for jsonl and the public benchmarks."),
    calib: int = typer.Option(64, "--calib", help="Calibration questions."),
    time_budget: float = typer.Option(540.0, "--time-budget", help="Seconds for the search: profiling stops at 70%, verification at 100%."),
    policies: str = typer.Option(None, help="Only these policies, ','-separated (default: every registered one)."),
    max_stages: int = typer.Option(3, "--max-stages", help="Stages per plan, 1..4."),
    max_places: int = typer.Option(6, "--max-places", help="Places searched: 'pre' and up to this minus one layers."),
    accuracy_weight: float = typer.Option(1.0, "--accuracy-weight", help="Objective: KL + this x (1 - accuracy) where labels exist."),
    seed: int = typer.Option(0, help="Seed: the calibration questions and random policies."),
    recycle: str = typer.Option(
        "nearest", "--recycle",
        help="Recycling modes also verified on each searched schedule, ','-separated: nearest, context; none: off."),
    spatial: str = typer.Option(
        "none", "--spatial",
        help="Grid-term weights w (DivPrune spatial=w) also verified on each searched schedule that starts with "
             "divprune@pre, ','-separated (e.g. 0.25,0.5); none: off."),
    download: bool = typer.Option(False),
    json_out: bool = typer.Option(False, "--json", help="stdout is one JSON object; its `plan` plugs into `eval --plans`."),
) -> None:
    """Search plans for the one that changes the model's answers least within a budget."""
    from pruneware.evals.datasets import BENCHMARKS
    from pruneware.policies import get_policy
    from pruneware.tuning import Budget, tune as run_tune
    from pruneware.tuning.recycling import checked_modes
    from pruneware.tuning.spatial import checked_weights

    budget = Budget.of(_budget(avg_tokens, flops_ratio, latency_ms))  # checks the range
    if calib < 1:
        raise UserError(f"--calib must be >= 1, got {calib}")
    if accuracy_weight < 0:
        raise UserError(f"--accuracy-weight must be >= 0, got {accuracy_weight:g}")
    if not 1 <= max_stages <= 4:
        raise UserError(f"--max-stages must be in 1..4, got {max_stages}")
    if max_places < 2:
        raise UserError(f"--max-places must be >= 2 ('pre' and one layer), got {max_places}")
    if time_budget <= 0:
        raise UserError(f"--time-budget must be > 0 seconds, got {time_budget:g}")
    if vision_flops_ratio is not None and not 0.0 < vision_flops_ratio <= 1.0:
        raise UserError(f"--vision-flops-ratio must be in (0, 1] (vision FLOPs relative to unpruned), got {vision_flops_ratio:g}")
    if bench.lower() not in BENCHMARKS:
        raise UserError(f"unknown benchmark {bench!r}; valid benchmarks: {', '.join(BENCHMARKS)}")
    names = [p.strip() for p in policies.split(",") if p.strip()] if policies else None
    checked_modes(recycle)  # an unknown mode fails here, listing the valid ones
    checked_weights(spatial)  # so does a bad grid-term weight
    for policy in names or ():
        get_policy(policy)  # an unknown name fails here, listing the valid ones
    items = _calibration(bench.lower(), data, calib, seed)  # a bad dataset fails before the model loads
    vlm, processor, name = load_model(model, download)
    console = Console(stderr=True)
    columns = (TextColumn("tune"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=json_out) as progress:
        task = progress.add_task("reference", total=None)

        def on_progress(done: int, total: int, phase: str) -> None:
            progress.update(task, completed=done, total=total, description=phase)

        result = run_tune(vlm, processor, items, budget, bench=bench.lower(), seed=seed, policies=names,
                          max_stages=max_stages, max_places=max_places, accuracy_weight=accuracy_weight,
                          time_budget_s=time_budget, vision_flops_ratio=vision_flops_ratio, recycle=recycle,
                          spatial=spatial,
                          on_progress=on_progress)
    report = result.report
    payload = {"model": name, "plan": str(result.plan), "budget": str(budget), "bench": bench,
               "calibration": len(items), **{k: v for k, v in report.summary().items() if k != "candidates"},
               "candidates": report.candidates}
    if json_out:
        emit_json(payload)
        return
    table = Table(title=f"{name}: best plans measured on {len(items)} calibration questions ({budget})")
    for column in ("plan", "origin", "loss", "KL", "accuracy", "cost"):
        table.add_column(column, justify="right")
    for c in sorted((c for c in report.candidates if c["phase"] == "verify"), key=lambda c: c["loss"]):
        acc = "-" if c["accuracy"] is None else f"{c['accuracy']:.3f}"
        table.add_row(c["plan"], c.get("origin", ""), f"{c['loss']:.4f}", f"{c['kl']:.4f}", acc, f"{c['predicted_cost']:.4g}")
    out = Console()
    out.print(table)
    out.print(f"tuned plan: [bold]{result.plan}[/bold]")
    out.print(f"cost: predicted {report.predicted_cost:.4g}, measured {report.measured_cost:.4g} "
              f"(unpruned {report.unpruned_cost:.4g}); {len(report.candidates)} plans measured in {report.time_s:.0f} s"
              + (" (time budget reached)" if report.stopped_early else ""))
    if vision_flops_ratio is not None:
        out.print(f"vision FLOPs: {report.chosen['vision_ratio']:.3f} of unpruned (budget {vision_flops_ratio:g})")
    out.print(f'evaluate it: pruneware eval --plans "{result.plan}"')
