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
import io
import json
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


def _datasets_lib():
    try:
        import datasets
    except ImportError:
        raise MissingExtraError("reading TextVQA, POPE, GQA or MME needs `datasets`: pip install 'pruneware[eval]'") from None
    return datasets


def _check_local(path, bench: Benchmark, allow_download: bool) -> str | None:
    """The hub id to download from, or None when ``path`` is local; refuses unasked downloads."""
    if path is None:
        if allow_download and bench.hub_id:
            return bench.hub_id
        raise DatasetError(f"{bench.name} needs a path to local files (a download of {bench.hub_id}), or allow_download=True")
    if Path(path).expanduser().exists():
        return None
    if _HUB_ID.match(str(path)):
        if allow_download:
            return str(path)
        raise DatasetError(
            f"{path!r} is no local file or folder but looks like a hub id, and pruneware downloads only when asked: run "
            f"`huggingface-cli download --repo-type dataset {path} --local-dir DIR` and pass DIR, or allow_download=True"
        )
    raise DatasetError(f"{path}: no such file or folder")


def _data_files(root: Path, split: str | None, part: str | None = None) -> list[Path]:
    """Data files under ``root`` (itself if a file), narrowed to ``split`` and ``part`` when any match.

    Hub layouts name shards ``{split}-00000-of-00003.parquet``; GQA keeps each table in a
    folder such as ``testdev_balanced_images``, so ``part="images"`` prefers that folder and,
    failing it, any path containing ``images``.
    """
    files = sorted(f for f in root.rglob("*") if f.suffix in DATA_SUFFIXES) if root.is_dir() else [root]
    rel = {f: str(f.relative_to(root)) if root.is_dir() else f.name for f in files}
    files = [f for f in files if not any(part.startswith(".") for part in Path(rel[f]).parts)]  # skip .cache/
    narrowings = [lambda f: f.name.startswith((f"{split}-", f"{split}.")) or f.parent.name == split]
    if part is not None:
        narrowings += [lambda f: part in rel[f], lambda f: f"{split}_balanced_{part}" in rel[f]]
    for keep in narrowings:
        files = [f for f in files if keep(f)] or files
    if not files:
        raise DatasetError(f"{root}: no data files ({', '.join(DATA_SUFFIXES)})")
    if len({DATA_SUFFIXES[f.suffix] for f in files}) > 1:
        raise DatasetError(f"{root}: mixed file formats {sorted({f.suffix for f in files})}; keep one")
    return files


def _open_table(path, bench: Benchmark, split: str | None, allow_download: bool, part: str | None = None):
    """A ``datasets.Dataset`` from local files, or from the hub when asked."""
    hub_id = _check_local(path, bench, allow_download)
    lib = _datasets_lib()
    if hub_id is not None:
        config = f"{split}_balanced_{part}" if bench.name == "gqa" and part else None
        return lib.load_dataset(hub_id, config, split=split)
    root = Path(path).expanduser()
    if root.is_dir() and ((root / "state.json").is_file() or (root / "dataset_dict.json").is_file()):
        table = lib.load_from_disk(str(root))
        if isinstance(table, lib.DatasetDict):
            if split not in table:
                raise DatasetError(f"{root}: no split {split!r}; splits: {list(table)}")
            table = table[split]
        return table
    files = _data_files(root, split, part)
    builder = DATA_SUFFIXES[files[0].suffix]
    return lib.load_dataset(builder, data_files=[str(f) for f in files], split="train")


def _rows(table, bench: str, required: Sequence[str], optional: Sequence[str] = (), image: bool = True) -> list[dict]:
    """The ``required`` and present ``optional`` columns as row dicts; checks the columns (and ``image``) exist."""
    missing = [c for c in (*required, *(["image"] if image else [])) if c not in table.column_names]
    if missing:
        raise DatasetError(f"{bench}: the table lacks column(s) {missing} of the lmms-lab format; it has {table.column_names}")
    return table.select_columns([*required, *(c for c in optional if c in table.column_names)]).to_list()


def _flat_table(name: str, path, split, allow_download, required: list[str], optional: Sequence[str] = ()):
    """(row dicts, image column, image loader) of a benchmark kept in one table."""
    table = _open_table(path, BENCHMARKS[name], split, allow_download)
    rows, images = _rows(table, name, required, optional), table.select_columns(["image"])
    return rows, lambda i: functools.partial(_table_image, images, i, name)


def _load_textvqa(path, split, limit, seed, allow_download) -> list[Item]:
    rows, image = _flat_table("textvqa", path, split, allow_download, ["question_id", "question", "answers"], ["image_id"])
    pick = _subsample(len(rows), limit, seed)
    return [Item(image(i), r["question"], r["answers"], "textvqa", str(r["question_id"]), str(r.get("image_id") or ""))
            for i in pick for r in [rows[i]]]  # fmt: skip


def _load_pope(path, split, limit, seed, allow_download) -> list[Item]:
    cols = ["question_id", "question", "answer", "category"]
    rows, image = _flat_table("pope", path, split, allow_download, cols, ["image_source"])
    pick = _subsample(len(rows), limit, seed)
    return [Item(image(i), r["question"], [r["answer"].strip().lower()], r["category"],
                 f"{r['category']}-{r['question_id']}", str(r.get("image_source") or "")) for i in pick for r in [rows[i]]]  # fmt: skip


def _load_mme(path, split, limit, seed, allow_download) -> list[Item]:
    rows, image = _flat_table("mme", path, split, allow_download, ["question_id", "question", "answer", "category"])
    image_ids = [str(r["question_id"]) for r in rows]  # the image path, shared by its two questions
    seen: dict[str, int] = {}
    items = []
    for i, (r, im) in enumerate(zip(rows, image_ids)):
        k = seen[im] = seen.get(im, -1) + 1  # the image's k-th question
        items.append(Item(image(i), r["question"], [r["answer"]], r["category"], f"{im}#{k}", im))
    return [items[i] for i in _subsample(len(rows), limit, seed, groups=image_ids)]


def _load_gqa(path, split, limit, seed, allow_download) -> list[Item]:
    bench = BENCHMARKS["gqa"]
    questions = _open_table(path, bench, split, allow_download, part="instructions")
    rows = _rows(questions, "gqa", ["id", "imageId", "question", "answer"], ["types"], image=False)
    images, image_row = questions, None  # a single table may hold the images already
    if "image" not in questions.column_names:
        images = _open_table(path, bench, split, allow_download, part="images")
        image_row = {str(r["id"]): i for i, r in enumerate(_rows(images, "gqa images", ["id"]))}
    images = images.select_columns(["image"])
    items = []
    for i in _subsample(len(rows), limit, seed):
        r = rows[i]
        row = i if image_row is None else image_row.get(str(r["imageId"]))
        if row is None:
            raise DatasetError(f"gqa: question {r['id']} refers to image {r['imageId']}, not in the images table")
        types = r.get("types") or {}
        loader = functools.partial(_table_image, images, row, "gqa")
        task = types.get("structural") or "gqa"  # verify, query, choose, logical, compare
        items.append(Item(loader, r["question"], [r["answer"]], task, str(r["id"]), str(r["imageId"])))
    return items


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("synthetic", _load_synthetic, None, None, "seeded synthetic VQA, eval split (no files)"),
        Benchmark("jsonl", _load_jsonl, None, None, "local JSON lines: image, question, answer(s)"),
        Benchmark("textvqa", _load_textvqa, "validation", "lmms-lab/textvqa", "TextVQA, VQA accuracy"),
        Benchmark("pope", _load_pope, "test", "lmms-lab/POPE", "POPE yes/no hallucination, F1"),
        Benchmark("gqa", _load_gqa, "testdev", "lmms-lab/GQA", "GQA testdev balanced, exact match"),
        Benchmark("mme", _load_mme, "test", "lmms-lab/MME", "MME yes/no pairs, perception + cognition"),
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
