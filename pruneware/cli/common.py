"""Shared CLI plumbing: one-line user errors, model and image loading, JSON output."""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import typer

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_MODEL = "tiny-llava"


class UserError(Exception):
    """A mistake in what the user asked for: reported in one line, exit code 2."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    from pruneware.errors import ArgumentError
    from pruneware.models.loading import ModelLoadError
    from pruneware.plans import PlanError
    from pruneware.policies.crosslmm.compressor import CompressorError

    types: list[type[BaseException]] = [
        UserError, PlanError, ArgumentError, CompressorError, ModelLoadError, FileNotFoundError,
    ]
    try:
        from pruneware.evals.datasets import DatasetError

        types.append(DatasetError)
    except ImportError:
        pass
    return tuple(types)


def user_errors(fn: F) -> F:
    """Turn user mistakes into `error: ...` on stderr and exit code 2, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _user_error_types() as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(2) from None
        except TypeError as err:
            if "pruneware does not support" in str(err):
                typer.echo(f"error: {err}", err=True)
                raise typer.Exit(2) from None
            raise

    return wrapper  # type: ignore[return-value]


def emit_json(payload: dict) -> None:
    sys.stdout.write(json.dumps(payload, indent=1, default=str) + "\n")


def device_name(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_model(name: str | None, download: bool = False, device: str | None = None):
    """(model, processor, name) for an embedded name, a local folder, or (with download) a hub id."""
    from pruneware.models.loading import load_any

    name = name or DEFAULT_MODEL
    model, processor = load_any(name, download, device)
    return model, processor, name


def sample() -> dict:
    """The bundled sample image and its question."""
    root = resources.files("pruneware") / "assets"
    meta = json.loads((root / "sample.json").read_text())
    return {"image": str(root / "sample.png"), **meta}


def load_image(path: str | None):
    from PIL import Image, UnidentifiedImageError

    path = path or sample()["image"]
    if not Path(path).is_file():
        raise UserError(f"image not found: {path}")
    try:
        return Image.open(path).convert("RGB")
    except (UnidentifiedImageError, OSError):
        raise UserError(f"not a readable image: {path}") from None


def parse_list(
    text: str | None, cast: Callable[[str], Any] = str, *, minimum: float | None = None, option: str = "value"
) -> list[Any]:
    """A comma-separated option; with `minimum`, every number must be >= it."""
    if not text:
        return []
    try:
        values = [cast(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"could not parse {text!r} as a comma-separated list of {cast.__name__}") from None
    if minimum is not None:
        check_minimum(option, values, minimum)
    return values


def small_images_option():
    """The `--small-images` option of the commands that take `--avg-tokens` (see `check_small_images`)."""
    return typer.Option(
        "error", "--small-images",
        help="Under --avg-tokens, an image with fewer visual tokens than the budget: error (the whole batch fails) "
        "or keep (that image keeps all its tokens; reports list it in below_budget).",
    )


def check_small_images(value: str) -> str:
    from pruneware.engine.arguments import SMALL_IMAGES

    if value not in SMALL_IMAGES:
        raise UserError(f"--small-images must be one of {', '.join(SMALL_IMAGES)}, got {value!r}")
    return value


def check_out_folder(path: str, option: str = "--out") -> Path:
    """`path` as a folder we may create or write into; a one-line UserError when it, or a folder
    above it, is an existing file."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option} {path} is an existing file; give a folder")
    _check_parents(folder, option, path)
    return folder


def check_out_file(path: str, option: str = "--out") -> Path:
    """`path` as an image file to write: its extension must be one PIL writes, and no folder
    above it may be a file. Creates the missing folders above it."""
    from PIL import Image

    target = Path(path)
    if target.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file name such as {Path(path) / 'kept.png'}")
    Image.init()
    writable = sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE)
    if target.suffix.lower() not in writable:
        raise UserError(f"{option} {path} needs an image extension that PIL writes, such as .png or .jpg")
    _check_parents(target.parent, option, path)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _check_parents(path: Path, option: str, given: str) -> None:
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{option} {given}: {parent} is a file, not a folder")
            return


def check_device(device: str | None) -> str:
    """The device to run on (default: cuda when available, else cpu); a one-line UserError for a
    name torch does not know or a CUDA device this machine lacks."""
    import torch

    name = device_name(device)
    try:
        parsed = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {name}: no CUDA GPU is available on this machine; use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise UserError(f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
    elif parsed.type != "cpu":
        raise UserError(f"--device {name}: pruneware runs on cpu or cuda")
    return name


def check_minimum(option: str, values: list[Any], minimum: float) -> None:
    """Raise a one-line UserError unless every value is >= minimum."""
    bad = [v for v in values if v < minimum]
    if bad:
        raise UserError(f"{option} must be >= {minimum:g}, got {bad[0]:g}")


def split_plans(text: str) -> list[str]:
    """Plans separated by ';' when any is present (multi-stage plans contain ','), else by ','.

    Without ';', a string that is one complete multi-stage plan (every stage writes its place and
    budget, in layer order, e.g. what `pruneware tune` prints) is that one plan.
    """
    outside = re.sub(r"\[[^\]]*\]", lambda m: "_" * len(m[0]), text)  # ';' also separates a policy's [params]
    if ";" not in outside and "," in text and _one_written_plan(text):
        return [text.strip()]
    separator = ";" if ";" in outside else ","
    cuts = [i for i, ch in enumerate(outside) if ch == separator]
    parts = (text[a + 1 : b] for a, b in zip([-1, *cuts], [*cuts, len(text)], strict=True))
    plans = [p.strip() for p in parts if p.strip()]
    if not plans:
        raise UserError("no plans given")
    return plans


def _one_written_plan(text: str) -> bool:
    from pruneware.plans import Plan, PlanError, writes_budgets

    parts = [p.strip() for p in text.split(",")]
    if not all("@" in p and writes_budgets(p) for p in parts):
        return False
    try:
        Plan.parse(text)
    except PlanError:
        return False
    return True
