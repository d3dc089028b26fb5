"""The item type every benchmark loader returns, the benchmark record, and shared helpers."""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SYNTHETIC_N = 500
DATA_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json"}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class DatasetError(ValueError):
    """A benchmark could not be read: names the file (and line) and what is wrong."""


class MissingExtraError(DatasetError, ImportError):
    """The ``datasets`` library, needed for the public formats, is not installed."""


class Item:
    """One question about one image: the type every loader returns.

    ``image`` is given as a PIL image or as a zero-argument loader; ``item.image`` always
    returns a PIL image, decoded again on each read so that a long benchmark never holds all its
    images in memory. ``answers`` holds every acceptable answer (TextVQA's ten human answers).
    ``image_id`` names the image; questions about the same image share it (MME pairs on it).
    ``answer`` is the first answer, so items also fit the synthetic ``evaluate()``.
    """

    __slots__ = ("_image", "question", "answers", "task", "id", "image_id")

    def __init__(self, image: Image.Image | Callable[[], Image.Image], question: str, answers: Sequence[str],
                 task: str, id: str, image_id: str = "") -> None:  # fmt: skip
        if isinstance(answers, str) or not answers:
            raise ValueError(f"answers must be a non-empty list of strings, got {answers!r}")
        self._image = image
        self.question, self.answers, self.task, self.id = question, list(answers), task, id
        self.image_id = image_id or id

    @property
    def image(self) -> Image.Image:
        return self._image() if callable(self._image) else self._image

    @property
    def answer(self) -> str:
        return self.answers[0]

    def __repr__(self) -> str:
        return f"Item(id={self.id!r}, task={self.task!r}, question={self.question!r}, answers={self.answers!r})"


@dataclass(frozen=True)
class Benchmark:
    """A registered benchmark: its loader, default split and hub id (used only on request)."""

    name: str
    load: Callable[..., list[Item]]  # (path, split, limit, seed, allow_download) -> items
    split: str | None
    hub_id: str | None
    description: str


def _subsample(n: int, limit: int | None, seed: int, groups: Sequence[str] | None = None) -> list[int]:
    """Row indices to keep, in file order: all, or a seeded random ``limit`` of them.

    With ``groups``, whole groups are kept (MME needs both questions of an image).
    """
    if limit is None or limit >= n:
        return list(range(n))
    rng, members = np.random.default_rng(seed), {}
    if groups is None:
        return sorted(rng.choice(n, size=limit, replace=False).tolist())
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    keep: list[int] = []
    for g in rng.permutation(list(members)):
        if len(keep) + len(members[g]) <= limit:
            keep += members[g]
    return sorted(keep)


def _to_pil(value, where: str) -> Image.Image:
    """An RGB image from what a table holds: a PIL image, or ``{"bytes", "path"}``."""
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        value = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
    if not isinstance(value, Image.Image):
        raise DatasetError(f"{where}: the image cell holds {type(value).__name__}, not an image")
    return value.convert("RGB")


def _open_file(path: Path, where: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as e:
        raise DatasetError(f"{where}: cannot read image {path}: {e}") from None


def _table_image(table, row: int, where: str) -> Image.Image:
    return _to_pil(table[row]["image"], f"{where} row {row}")
