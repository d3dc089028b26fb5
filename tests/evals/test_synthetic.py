"""The synthetic VQA benchmark: determinism, disjoint splits, well-formed questions."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pruneware.evals.synthetic import (
    GLYPHS,
    TASKS,
    make_multi,
    make_split,
    scene_seed,
    split_of,
    vocabulary,
)
from pruneware.evals.synthetic.accuracy import normalize
from pruneware.evals.synthetic.questions import NUMBERS


def _key(e):
    return (e.id, e.question, e.answer, e.task, np.asarray(e.image).tobytes())


def test_generator_is_deterministic():
    a, b = make_split("eval", 10, seed=3), make_split("eval", 10, seed=3)
    assert [_key(e) for e in a] == [_key(e) for e in b]
    img1, qa1, _ = make_multi(123, 6)
    img2, qa2, _ = make_multi(123, 6)
    assert qa1 == qa2 and np.array_equal(np.asarray(img1), np.asarray(img2))


def test_seeds_give_fresh_splits():
    a, b = make_split("eval", 10, seed=0), make_split("eval", 10, seed=1)
    assert not {e.id for e in a} & {e.id for e in b}
    assert [e.question for e in a] != [e.question for e in b]


def test_train_and_eval_splits_are_disjoint():
    train = make_split("train", 50, seed=0)
    evals = make_split("eval", 50, seed=0)
    seeds = lambda xs: {int(e.id.split("-")[1]) for e in xs}  # noqa: E731
    assert all(s < 10**9 for s in seeds(train)) and all(10**9 <= s < 2 * 10**9 for s in seeds(evals))
    assert all(split_of(s) == "train" for s in seeds(train))
    assert all(split_of(s) == "eval" for s in seeds(evals))
    images = {np.asarray(e.image).tobytes() for e in train}
    assert not any(np.asarray(e.image).tobytes() in images for e in evals)
    for i in range(200):
        assert scene_seed("train", 7, i) < 10**9 <= scene_seed("eval", 7, i)


def test_questions_are_well_formed():
    ex = make_split("eval", 250, seed=11)
    assert Counter(e.task for e in ex) == {t: 50 for t in TASKS}
    vocab = set(vocabulary())
    for e in ex:
        assert e.image.size == (336, 336) and e.image.mode == "RGB"
        assert set(e.question.replace("?", " ?").split()) <= vocab
        assert e.answer in vocab and " " not in e.answer
    answers = {t: Counter(e.answer for e in ex if e.task == t) for t in TASKS}
    for t in ("existence", "spatial"):
        assert set(answers[t]) == {"yes", "no"} and min(answers[t].values()) >= 15
    assert set(answers["counting"]) <= set(NUMBERS[1:5]) and len(answers["counting"]) >= 3
    assert set(answers["glyph"]) <= set(GLYPHS) and len(answers["glyph"]) >= 4


def test_glyph_is_inside_its_shape():
    for e in make_split("eval", 20, seed=5, tasks=("glyph",)):
        color, shape = e.question.removeprefix("what letter is on the ").rstrip("?").split()
        (obj,) = [o for o in e.scene.objects if (o.color, o.shape) == (color, shape)]
        assert obj.glyph == e.answer


def test_bad_names_list_valid_options():
    with pytest.raises(ValueError, match="valid splits"):
        make_split("test", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="valid tasks"):
        make_split("eval", 1, tasks=("colour",))


def test_normalize_takes_first_word():
    assert normalize(" Red.") == "red"
    assert normalize("") == "" and normalize("yes no") == "yes"
