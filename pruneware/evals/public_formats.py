"""Readers for the lmms-lab formats of TextVQA, POPE, GQA and MME (see `datasets.py` for the
columns), through the `datasets` library, from local files only unless a download is asked for."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

from pruneware.evals.items import (
    _HUB_ID,
    DATA_SUFFIXES,
    Benchmark,
    DatasetError,
    Item,
    MissingExtraError,
    _subsample,
    _table_image,
)


def _benchmark(name: str) -> Benchmark:
    return PUBLIC_BENCHMARKS[name]


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
    table = _open_table(path, _benchmark(name), split, allow_download)
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
    bench = _benchmark("gqa")
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


PUBLIC_BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("textvqa", _load_textvqa, "validation", "lmms-lab/textvqa", "TextVQA, VQA accuracy"),
        Benchmark("pope", _load_pope, "test", "lmms-lab/POPE", "POPE yes/no hallucination, F1"),
        Benchmark("gqa", _load_gqa, "testdev", "lmms-lab/GQA", "GQA testdev balanced, exact match"),
        Benchmark("mme", _load_mme, "test", "lmms-lab/MME", "MME yes/no pairs, perception + cognition"),
    )
}
