"""`pruneware run`: answer one question about one image, with and without pruning."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

import pruneware
from pruneware.cli.common import (
    UserError, check_minimum, check_small_images, emit_json, load_image, load_model, sample, small_images_option,
    user_errors,
)
from pruneware.evals.runner import timed_answers


@user_errors
def run(
    model: str = typer.Option(None, help="Embedded name, local folder, or hub id (with --download). Default: tiny-llava."),
    image: str = typer.Option(None, help="Image file. Default: the bundled sample."),
    video: str = typer.Option(None, help="Video file, or a folder of frame images (Qwen models; read by qwen-vl-utils)."),
    prompt: str = typer.Option(None, help="Question. Default: the sample's question."),
    plan: str = typer.Option("divprune", help="Plan string or preset name."),
    avg_tokens: float = typer.Option(None, "--avg-tokens", help="Solve budgets for this many visual tokens per layer."),
    small_images: str = small_images_option(),
    max_new_tokens: int = typer.Option(8, "--max-new-tokens"),
    seed: int = typer.Option(0),
    download: bool = typer.Option(False, help="Allow fetching a hub model id."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Answer a question about an image with and without pruning, side by side."""
    from pruneware.evals.qwen_inputs import vision_inputs

    check_minimum("--max-new-tokens", [max_new_tokens], 1)
    check_small_images(small_images)
    if image is not None and video is not None:
        raise UserError("give --image or --video, not both")
    question = prompt or (sample()["question"] if image is None and video is None else None)
    if question is None:
        raise typer.BadParameter(f"--prompt is required with --{'image' if image is not None else 'video'}")
    if video is not None:
        vlm, processor, name = load_model(model, download)
        inputs = video_inputs(processor, name, question, video).to(vlm.device)
    else:
        picture = load_image(image)
        vlm, processor, name = load_model(model, download)
        inputs = vision_inputs(processor, [question], [picture]).to(vlm.device)
    session = pruneware.prune(vlm, plan, seed=seed, avg_tokens=avg_tokens, small_images=small_images)
    _, (base_answer,), base_ms = timed_answers(vlm, processor, inputs, max_new_tokens)
    with session:
        _, (pruned_answer,), pruned_ms = timed_answers(vlm, processor, inputs, max_new_tokens)
    base, pruned = (base_answer, base_ms), (pruned_answer, pruned_ms)
    report = session.report
    n_visual = report.stages[0].n_before[0] if report.stages else 0
    result = {
        "model": name, "question": question, "plan": str(report.plan),
        "unpruned": {"answer": base[0], "visual_tokens": n_visual, "prefill_ms": round(base[1], 2)},
        "pruned": {"answer": pruned[0], "avg_visual_tokens": round(report.avg_visual_tokens, 2),
                   "kept_per_stage": [s.n_after[0] for s in report.stages], "prefill_ms": round(pruned[1], 2),
                   "flops_ratio": round(report.flops_ratio, 4)},
    }
    if json_out:
        emit_json(result)
        return
    table = Table(title=f"{name}: {question}")
    for column in ("", "answer", "visual tokens / layer", "prefill ms", "LM FLOPs"):
        table.add_column(column)
    table.add_row("unpruned", base[0], str(n_visual), f"{base[1]:.1f}", "1.00")
    table.add_row(f"pruned ({report.plan})", pruned[0], f"{report.avg_visual_tokens:.1f}", f"{pruned[1]:.1f}",
                  f"{report.flops_ratio:.2f}")
    Console().print(table)


def video_inputs(processor, model_name: str, question: str, video: str):
    """One question about a video (a file, or a folder of frame images in name order), built by
    Qwen's tooling (`pruneware.evals.qwen_inputs`); a one-line UserError for other models."""
    from pathlib import Path

    from pruneware.evals.qwen_inputs import is_qwen_processor, qwen_inputs

    if not is_qwen_processor(processor):
        raise UserError(f"--video needs a Qwen model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), e.g. tiny-qwen2.5-vl; "
                        f"{model_name} takes images only")
    path = Path(video)
    if path.is_dir():
        names = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        frames = [load_image(str(p)) for p in names]
        if not frames:
            raise UserError(f"--video {video}: the folder holds no frame images")
        return qwen_inputs(processor, [question], videos=[frames])
    if not path.is_file():
        raise UserError(f"video not found: {video}")
    return qwen_inputs(processor, [question], videos=[str(path)])
