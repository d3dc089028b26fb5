"""Benchmark loaders on tiny fixture files written in each public schema, and JSONL checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pruneware.evals.datasets import BENCHMARKS, DatasetError, Item, load_benchmark, load_jsonl
from pruneware.evals.synthetic import make_split

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def _img(i: int) -> Image.Image:
    return Image.new("RGB", (8, 6), COLORS[i % len(COLORS)])


def _write(datasets, path: Path, columns: dict, features: dict | None = None) -> Path:
    """Save ``columns`` as a parquet file, with ``image`` as an Image feature, like the hub files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    feats = None
    if features is not None:
        feats = datasets.Features({k: features.get(k, datasets.Value("string")) for k in columns})
    datasets.Dataset.from_dict(columns, features=feats).to_parquet(str(path))
    return path


def _image_features(datasets, extra: dict | None = None) -> dict:
    return {"image": datasets.Image(), **(extra or {})}


# --- the lmms-lab formats ----------------------------------------------------------------------


def test_pope_reads_the_test_split_and_categories(hf_datasets, tmp_path):
    cats = ["adversarial", "popular", "random", "random"]
    cols = {
        "id": [str(i) for i in range(4)], "question_id": [str(i % 2 + 1) for i in range(4)],
        "question": [f"Is there a cat {i}?" for i in range(4)], "answer": ["yes", "no", "Yes", "no"],
        "image_source": [f"COCO_{i}" for i in range(4)], "image": [_img(i) for i in range(4)], "category": cats,
    }  # fmt: skip
    _write(hf_datasets, tmp_path / "data" / "test-00000-of-00001.parquet", cols, _image_features(hf_datasets))
    decoy = {**cols, "category": ["decoy"] * 4}  # another config's shard in the same snapshot
    _write(hf_datasets, tmp_path / "Full" / "adversarial-00000-of-00001.parquet", decoy, _image_features(hf_datasets))
    items = load_benchmark("pope", tmp_path)
    assert [it.task for it in items] == cats
    assert [it.answers for it in items] == [["yes"], ["no"], ["yes"], ["no"]]
    assert len({it.id for it in items}) == 4 and items[0].image_id == "COCO_0"
    image = items[2].image
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.getpixel((0, 0)) == COLORS[2]


def test_textvqa_keeps_all_answers_and_the_validation_split(hf_datasets, tmp_path):
    feats = _image_features(hf_datasets, {"answers": hf_datasets.Sequence(hf_datasets.Value("string")),
                                          "question_id": hf_datasets.Value("int32")})  # fmt: skip
    for split, n in (("train", 3), ("validation", 2)):
        cols = {
            "image_id": [f"{split}{i}" for i in range(n)], "question_id": list(range(n)),
            "question": ["what is written?"] * n, "image": [_img(i) for i in range(n)],
            "answers": [[f"word{i}"] * 7 + ["other"] * 3 for i in range(n)], "set_name": [split] * n,
        }  # fmt: skip
        _write(hf_datasets, tmp_path / "data" / f"{split}-00000-of-00001.parquet", cols, feats)
    items = load_benchmark("textvqa", tmp_path)
    assert len(items) == 2 and {it.task for it in items} == {"textvqa"}
    assert items[1].answers == ["word1"] * 7 + ["other"] * 3 and items[1].image_id == "validation1"
    assert len(load_benchmark("textvqa", tmp_path, split="train")) == 3


def _mme_file(datasets, path: Path, n_images: int) -> Path:
    cols = {"question_id": [], "image": [], "question": [], "answer": [], "category": []}
    for i in range(n_images):
        for answer in ("Yes", "No"):
            cols["question_id"].append(f"existence/{i:04d}.png")
            cols["image"].append(_img(i))
            cols["question"].append(f"Is there a dog? Please answer yes or no. ({answer})")
            cols["answer"].append(answer)
            cols["category"].append("existence" if i % 2 else "code_reasoning")
    return _write(datasets, path, cols, _image_features(datasets))


def test_mme_pairs_questions_by_image_and_limit_keeps_whole_pairs(hf_datasets, tmp_path):
    path = _mme_file(hf_datasets, tmp_path / "mme.parquet", n_images=3)
    items = load_benchmark("mme", path)
    assert len(items) == 6 and items[0].id == "existence/0000.png#0" and items[1].id == "existence/0000.png#1"
    assert items[0].image_id == items[1].image_id and items[0].task == "code_reasoning"
    some = load_benchmark("mme", path, limit=5, seed=3)
    assert len(some) == 4
    pairs: dict[str, int] = {}
    for it in some:
        pairs[it.image_id] = pairs.get(it.image_id, 0) + 1
    assert set(pairs.values()) == {2}
    assert [it.id for it in some] == [it.id for it in load_benchmark("mme", path, limit=5, seed=3)]


def test_gqa_joins_questions_to_images_and_uses_structural_types(hf_datasets, tmp_path):
    types = hf_datasets.Features({"structural": hf_datasets.Value("string"), "semantic": hf_datasets.Value("string")})
    questions = {
        "id": ["q1", "q2", "q3"], "imageId": ["n2", "n1", "n2"],
        "question": ["Is the sky blue?", "What is on the table?", "Which is bigger?"],
        "answer": ["yes", "cup", "car"], "fullAnswer": ["Yes, it is.", "A cup.", "The car."],
        "isBalanced": [True, True, True],
        "types": [{"structural": s, "semantic": "attr"} for s in ("verify", "query", "choose")],
    }  # fmt: skip
    feats = {"isBalanced": hf_datasets.Value("bool"), "types": types}
    _write(hf_datasets, tmp_path / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet", questions, feats)
    _write(hf_datasets, tmp_path / "testdev_all_instructions" / "testdev-00000-of-00001.parquet",
           {**questions, "id": ["x1", "x2", "x3"]}, feats)  # fmt: skip
    images = {"id": ["n1", "n2"], "image": [_img(1), _img(2)]}
    _write(hf_datasets, tmp_path / "testdev_balanced_images" / "testdev-00000-of-00001.parquet", images,
           _image_features(hf_datasets))  # fmt: skip
    items = load_benchmark("gqa", tmp_path)
    assert [it.id for it in items] == ["q1", "q2", "q3"]
    assert [it.task for it in items] == ["verify", "query", "choose"]
    assert items[1].image.getpixel((0, 0)) == COLORS[1] and items[0].image.getpixel((0, 0)) == COLORS[2]


def test_gqa_without_types_and_with_a_missing_image(hf_datasets, tmp_path):
    q = {"id": ["q1"], "imageId": ["n9"], "question": ["What?"], "answer": ["cup"]}
    _write(hf_datasets, tmp_path / "testdev_balanced_instructions" / "testdev-0.parquet", q)
    _write(hf_datasets, tmp_path / "testdev_balanced_images" / "testdev-0.parquet",
           {"id": ["n1"], "image": [_img(0)]}, _image_features(hf_datasets))  # fmt: skip
    with pytest.raises(DatasetError, match="n9"):
        load_benchmark("gqa", tmp_path)
    single = {**q, "image": [_img(0)]}  # one table that already holds the images
    _write(hf_datasets, tmp_path / "one" / "gqa.parquet", single, _image_features(hf_datasets))
    assert [it.task for it in load_benchmark("gqa", tmp_path / "one")] == ["gqa"]


def test_save_to_disk_folder_and_missing_columns(hf_datasets, tmp_path):
    cols = {"question_id": ["a"], "question": ["Is it red?"], "answer": ["yes"], "image": [_img(0)]}
    full = {**cols, "category": ["random"]}
    feats = hf_datasets.Features({k: hf_datasets.Value("string") for k in full} | {"image": hf_datasets.Image()})
    hf_datasets.Dataset.from_dict(full, features=feats).save_to_disk(str(tmp_path / "saved"))
    assert load_benchmark("pope", tmp_path / "saved")[0].task == "random"
    _write(hf_datasets, tmp_path / "bad.parquet", cols, {"image": hf_datasets.Image()})
    with pytest.raises(DatasetError, match="category"):
        load_benchmark("pope", tmp_path / "bad.parquet")


# --- refusing downloads, names, synthetic ------------------------------------------------------


@pytest.mark.parametrize("name", ["pope", "textvqa", "gqa", "mme"])
def test_hub_ids_and_missing_paths_are_refused(name):
    hub = BENCHMARKS[name].hub_id
    with pytest.raises(DatasetError, match="allow_download=True"):
        load_benchmark(name, hub)
    with pytest.raises(DatasetError, match="needs a path"):
        load_benchmark(name)


def test_allow_download_asks_the_hub_for_the_lmms_lab_configs(hf_datasets, monkeypatch):
    calls = []

    def fake_load_dataset(repo, config=None, split=None):  # stands in for the hub: nothing is fetched
        calls.append((repo, config, split))
        if config == "testdev_balanced_images":
            return hf_datasets.Dataset.from_dict({"id": ["n1"], "image": [_img(0)]})
        return hf_datasets.Dataset.from_dict({"id": ["q1"], "imageId": ["n1"], "question": ["Q?"], "answer": ["cup"]})

    monkeypatch.setattr(hf_datasets, "load_dataset", fake_load_dataset)
    assert load_benchmark("gqa", allow_download=True)[0].image.size == (8, 6)
    assert calls == [("lmms-lab/GQA", "testdev_balanced_instructions", "testdev"),
                     ("lmms-lab/GQA", "testdev_balanced_images", "testdev")]  # fmt: skip


def test_unknown_benchmark_lists_the_valid_ones():
    with pytest.raises(DatasetError, match="valid benchmarks: synthetic, jsonl, textvqa, pope, gqa, mme"):
        load_benchmark("vqav2")


def test_synthetic_wraps_the_eval_split():
    items = load_benchmark("synthetic", limit=5, seed=1)
    ref = make_split("eval", 5, 1)
    assert [(it.question, it.answer, it.task, it.id) for it in items] == [(e.question, e.answer, e.task, e.id) for e in ref]
    assert items[0].image.size == ref[0].image.size
    with pytest.raises(DatasetError, match="no path"):
        load_benchmark("synthetic", "somewhere")


def test_item_image_may_be_a_loader():
    calls = []
    item = Item(lambda: calls.append(1) or _img(0), "q?", ["a"], "t", "i1")
    assert calls == [] and item.image.size == (8, 6) and calls == [1] and item.image_id == "i1"
    with pytest.raises(ValueError, match="non-empty"):
        Item(_img(0), "q?", [], "t", "i")


# --- local JSONL -------------------------------------------------------------------------------


def _jsonl(tmp_path: Path, rows: list) -> Path:
    path = tmp_path / "bench.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_good_rows(tmp_path):
    (tmp_path / "imgs").mkdir()
    _img(0).save(tmp_path / "imgs" / "a.png")
    absolute = tmp_path / "b.png"
    _img(1).convert("L").save(absolute)
    path = _jsonl(tmp_path, [
        {"image": "imgs/a.png", "question": "Color?", "answer": "red"},
        "",
        {"image": str(absolute), "question": "Count?", "answers": ["2", "two"], "task": "count", "id": "x"},
    ])  # fmt: skip
    items = load_jsonl(path)
    assert [(it.id, it.task, it.answers) for it in items] == [("bench-1", "jsonl", ["red"]), ("x", "count", ["2", "two"])]
    assert items[0].image.getpixel((0, 0)) == COLORS[0] and items[1].image.mode == "RGB"
    assert [it.id for it in load_benchmark("jsonl", path, limit=1, seed=0)] in (["bench-1"], ["x"])


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ('{"image": "a.png", "question": ', "bad JSON"),
        ('["a.png", "q", "a"]', "JSON object"),
        ({"image": "a.png", "answer": "red"}, "'question'"),
        ({"image": "a.png", "question": "q?"}, "'answers'"),
        ({"image": "a.png", "question": "q?", "answers": "red"}, "non-empty list of strings"),
        ({"image": "a.png", "question": "q?", "answers": [3]}, "non-empty list of strings"),
        ({"image": "missing.png", "question": "q?", "answer": "red"}, "image file not found"),
    ],
)
def test_jsonl_bad_rows_name_file_and_line(tmp_path, row, problem):
    _img(0).save(tmp_path / "a.png")
    path = _jsonl(tmp_path, [{"image": "a.png", "question": "ok?", "answer": "yes"}, row])
    with pytest.raises(DatasetError, match=problem) as info:
        load_jsonl(path)
    assert f"{path}:2:" in str(info.value)


def test_jsonl_unreadable_image_and_missing_file(tmp_path):
    (tmp_path / "a.png").write_bytes(b"not a png")
    path = _jsonl(tmp_path, [{"image": "a.png", "question": "ok?", "answer": "yes"}])
    item = load_jsonl(path)[0]
    with pytest.raises(DatasetError, match=r"bench.jsonl:1: cannot read image"):
        item.image
    with pytest.raises(DatasetError, match="no such JSONL file"):
        load_jsonl(tmp_path / "nope.jsonl")
