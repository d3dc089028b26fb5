"""`pruneware viz`: the image with the kept patches highlighted, one panel per stage."""

from __future__ import annotations

import torch
import typer
from PIL import Image, ImageDraw

import pruneware
from pruneware.cli.common import (
    UserError, check_out_file, emit_json, load_image, load_model, sample, check_small_images, small_images_option, user_errors,
)

CELL = 14


def _model_view(processor, inputs: dict, image: Image.Image, grid: tuple[int, int]) -> Image.Image:
    """The picture as the model saw it (un-normalised pixels for CLIP-style processors)."""
    pixels = inputs.get("pixel_values")
    proc = getattr(processor, "image_processor", None)
    if pixels is not None and pixels.dim() == 4 and proc is not None and getattr(proc, "image_mean", None):
        mean = torch.tensor(proc.image_mean).view(3, 1, 1)
        std = torch.tensor(proc.image_std).view(3, 1, 1)
        array = ((pixels[0].float().cpu() * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        return Image.fromarray(array)
    h, w = grid
    return image.resize((w * 28, h * 28))


def render_panels(view: Image.Image, grid: tuple[int, int], offset: int, stages: list[tuple[str, torch.Tensor]]) -> Image.Image:
    """Original + one panel per stage; dropped patches are dimmed. stages: (title, kept token indices)."""
    h, w = grid
    cell_w, cell_h = view.width / w, view.height / h
    panels = [("original", None)] + stages
    canvas = Image.new("RGB", (len(panels) * (view.width + 10), view.height + 24), "white")
    for i, (title, kept) in enumerate(panels):
        panel = view.copy()
        if kept is not None:
            shade = Image.new("RGBA", panel.size, (0, 0, 0, 0))
            draw = ImageDraw.Draw(shade)
            keep = set((kept - offset).tolist())
            for t in range(h * w):
                if t not in keep:
                    r, c = divmod(t, w)
                    draw.rectangle([c * cell_w, r * cell_h, (c + 1) * cell_w, (r + 1) * cell_h], fill=(0, 0, 0, 170))
            panel = Image.alpha_composite(panel.convert("RGBA"), shade).convert("RGB")
        canvas.paste(panel, (i * (view.width + 10), 24))
        ImageDraw.Draw(canvas).text((i * (view.width + 10) + 4, 4), title, fill="black")
    return canvas


@user_errors
def viz(
    out: str = typer.Option(..., help="Output PNG."),
    model: str = typer.Option(None, help="Embedded name, local folder, or hub id (with --download)."),
    image: str = typer.Option(None, help="Image file. Default: the bundled sample."),
    prompt: str = typer.Option(None, help="Question (attention policies are text-guided)."),
    plan: str = typer.Option("divprune@pre:0.25,adaptinfer@3:0.1", help="Plan string or preset name."),
    avg_tokens: float = typer.Option(None, "--avg-tokens"),
    small_images: str = small_images_option(),
    seed: int = typer.Option(0),
    download: bool = typer.Option(False),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Draw the kept patches over the image, one panel per stage."""
    from pruneware.evals.qwen_inputs import vision_inputs

    check_out_file(out)
    check_small_images(small_images)
    picture = load_image(image)
    question = prompt or sample()["question"]
    vlm, processor, name = load_model(model, download)
    inputs = vision_inputs(processor, [question], [picture]).to(vlm.device)  # Qwen: through qwen-vl-utils
    with pruneware.prune(vlm, plan, seed=seed, avg_tokens=avg_tokens, small_images=small_images) as run:
        with torch.inference_mode():
            vlm(**inputs)
    report = run.report
    layout = run.adapter.layout(inputs["input_ids"].cpu(), dict(inputs))
    if not layout.grids or not layout.grids[0]:
        raise UserError("the prompt holds no image tokens")
    grid = layout.grids[0][0]
    offset = int(layout.visual[0].nonzero()[0])
    stages = [(f"{s.policy}@{s.where}: {s.n_after[0]}/{s.n_before[0]}", s.kept[0].cpu()) for s in report.stages]
    canvas = render_panels(_model_view(processor, inputs, picture, grid), grid, offset, stages)
    canvas.save(out)
    result = {"out": out, "model": name, "plan": report.plan, "grid": list(grid),
              "stages": [{"title": t, "kept": len(k)} for t, k in stages]}
    if json_out:
        emit_json(result)
    else:
        typer.echo(f"wrote {out}: {len(stages)} stage panels over a {grid[0]}x{grid[1]} token grid")
