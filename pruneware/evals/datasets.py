"""Evaluation items and benchmark loaders, offline by default.

Every loader returns a list of :class:`Item`. ``synthetic`` generates its items; ``jsonl``
reads a local JSON-lines file; ``textvqa``, ``pope``, ``gqa`` and ``mme`` read the formats that
lmms-lab publishes on the Hugging Face hub, through the ``datasets`` library
(``pip install 'pruneware[eval]'``), from local files: one parquet, arrow or JSON-lines file, a
folder of them (such as a ``huggingface-cli download`` snapshot of the dataset repo) or a
``save_to_disk`` folder. A hub id is refused unless ``allow_download=True``.

Columns read, as in the lmms-lab dataset cards (default split in brackets):

- ``textvqa`` [validation]: ``question_id``, ``question``, ``answers`` (ten human answers), ``image``.
- ``pope`` [test]: ``question_id``, ``question``, ``answer`` (yes/no), ``category``
  (adversarial/popular/random), ``image``; ``image_source`` if present.
- ``mme`` [test]: ``question_id`` (the image path, shared by the image's two questions),
  ``question``, ``answer`` (Yes/No), ``category``, ``image``.
- ``gqa`` [testdev]: the ``{split}_balanced_instructions`` table (``id``, ``imageId``,
  ``question``, ``answer``; ``types.structural`` if present, as the task) joined on ``imageId``
  with the ``{split}_balanced_images`` table (``id``, ``image``).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from pruneware.evals.items import SYNTHETIC_N, Benchmark, DatasetError, Item, MissingExtraError, _open_file, _subsample
from pruneware.evals.public_formats import PUBLIC_BENCHMARKS

__all__ = ["BENCHMARKS", "Benchmark", "DatasetError", "Item", "MissingExtraError", "load_benchmark", "load_jsonl"]


def _load_synthetic(path, split, limit, seed, allow_download) -> list[Item]:
    if path is not None:
        raise DatasetError(f"the synthetic benchmark is generated and takes no path, got {path!r}")
    from .synthetic import make_split

    return [Item(e.image, e.question, [e.answer], e.task, e.id) for e in make_split("eval", SYNTHETIC_N if limit is None else limit, seed)]


def load_jsonl(path: str | Path, limit: int | None = None, seed: int = 0) -> list[Item]:
    """Items from a JSON-lines file, one object per line (blank lines are skipped).

    Each row: ``image`` (a path, relative to the file's folder or absolute), ``question``,
    ``answers`` (a list of strings) or ``answer`` (a string), and optionally ``task`` (default
    ``"jsonl"``) and ``id`` (default ``"<file stem>-<line>"``). Every row is checked, image file
    included, before any is returned; a bad one raises :class:`DatasetError` naming file:line.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such JSONL file")
    items = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                items.append(_jsonl_item(path, line_no, line))
    return [items[i] for i in _subsample(len(items), limit, seed)]


def _jsonl_item(path: Path, line_no: int, line: str) -> Item:
    where = f"{path}:{line_no}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: bad JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    for key in ("image", "question"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise DatasetError(f"{where}: missing or empty string field {key!r}")
    if "answers" not in row and "answer" not in row:
        raise DatasetError(f"{where}: needs 'answers' (a list of strings) or 'answer' (a string)")
    answers = row["answers"] if "answers" in row else [row["answer"]]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise DatasetError(f"{where}: answers must be a non-empty list of strings, got {answers!r}")
    image = Path(row["image"]).expanduser()
    image = image if image.is_absolute() else path.parent / image
    if not image.is_file():
        raise DatasetError(f"{where}: image file not found: {image}")
    loader = functools.partial(_open_file, image, where)
    item_id = str(row.get("id", f"{path.stem}-{line_no}"))
    return Item(loader, row["question"], answers, str(row.get("task", "jsonl")), item_id, str(image))


def _load_jsonl(path, split, limit, seed, allow_download) -> list[Item]:
    if path is None:
        raise DatasetError("the jsonl benchmark needs a path to a .jsonl file")
    return load_jsonl(path, limit, seed)


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("synthetic", _load_synthetic, None, None, "seeded synthetic VQA, eval split (no files)"),
        Benchmark("jsonl", _load_jsonl, None, None, "local JSON lines: image, question, answer(s)"),
        *PUBLIC_BENCHMARKS.values(),
    )
}


def load_benchmark(name: str, path: str | Path | None = None, limit: int | None = None, seed: int = 0,
                   allow_download: bool = False, split: str | None = None) -> list[Item]:  # fmt: skip
    """The items of benchmark ``name`` (see ``BENCHMARKS``), read from ``path``.

    ``limit`` keeps a seeded random subset of that many questions, in file order (for
    ``synthetic``: generates that many, default ``SYNTHETIC_N``; for ``mme``: whole image pairs,
    so up to ``limit``). ``split`` overrides the benchmark's default split.
    """
    bench = BENCHMARKS.get(name.lower())
    if bench is None:
        raise DatasetError(f"unknown benchmark {name!r}; valid benchmarks: {', '.join(BENCHMARKS)}")
    if limit is not None and limit < 0:
        raise DatasetError(f"limit must be >= 0 or None, got {limit}")
    return bench.load(path, split or bench.split, limit, seed, allow_download)
