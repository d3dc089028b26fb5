"""Seeded train and eval splits.

Every example comes from one *scene seed*. Train scene seeds lie in ``[0, 10**9)`` and eval
scene seeds in ``[10**9, 2 * 10**9)``, so the two splits never share a scene. Within a split,
the scene seed of example ``i`` is a hash of ``(seed, i)``: every ``seed`` gives a fresh split,
and the same ``(split, n, seed)`` always gives the same examples.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from .questions import GENERATORS, TASKS
from .scene import COLORS, SHAPES, Scene, render, sample_scene

Split = Literal["train", "eval"]
SEED_SPACE = 10**9
SPLIT_OFFSET: dict[str, int] = {"train": 0, "eval": SEED_SPACE}
MAX_OBJECTS = 6
MAX_COUNT = 4


@dataclass
class Example:
    """One question about one image. ``answer`` is a single lowercase word."""

    image: Image.Image
    question: str
    answer: str
    task: str
    id: str
    scene: Scene | None = None


def scene_seed(split: Split, seed: int, index: int) -> int:
    """The scene seed of example ``index`` of split ``split`` drawn with ``seed``."""
    if split not in SPLIT_OFFSET:
        raise ValueError(f"unknown split {split!r}; valid splits: {sorted(SPLIT_OFFSET)}")
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return SPLIT_OFFSET[split] + int.from_bytes(digest, "little") % SEED_SPACE


def split_of(scene_seed_value: int) -> Split:
    """Which split a scene seed belongs to."""
    if not 0 <= scene_seed_value < 2 * SEED_SPACE:
        raise ValueError(f"scene seed {scene_seed_value} outside [0, {2 * SEED_SPACE})")
    return "train" if scene_seed_value < SEED_SPACE else "eval"


def scene_for(task: str, rng: np.random.Generator, max_objects: int) -> Scene:
    """A scene biased so that ``task`` has a question with a spread of answers."""
    if task == "counting":
        kind = "shape" if rng.random() < 0.5 else "color"
        value = str(rng.choice(SHAPES if kind == "shape" else list(COLORS)))
        count = int(rng.integers(1, min(MAX_COUNT, max_objects) + 1))
        n = int(rng.integers(count, max_objects + 1))
        return sample_scene(rng, n, group=(kind, value, count))
    low = 2 if task == "spatial" else 1
    n = int(rng.integers(low, max(low, max_objects) + 1))
    return sample_scene(rng, n, glyph_prob=0.9 if task == "glyph" else 0.5)


_scene_for = scene_for  # the old private name, until recipes/tiny_models/common.py imports `scene_for`


def make_example(split: Split, seed_value: int, task: str, max_objects: int = MAX_OBJECTS) -> Example:
    """The example of ``task`` for one scene seed (resampling scenes that cannot host it)."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {list(TASKS)}")
    rng = np.random.default_rng(seed_value)
    for _ in range(100):
        scene = scene_for(task, rng, max_objects)
        qa = GENERATORS[task](scene, rng)
        if qa is not None:
            return Example(render(scene), qa[0], qa[1], task, f"{split}-{seed_value}-{task}", scene)
    raise RuntimeError(f"could not build a {task!r} question from scene seed {seed_value}")


def make_split(
    split: Split,
    n: int,
    seed: int = 0,
    tasks: tuple[str, ...] = TASKS,
    max_objects: int = MAX_OBJECTS,
) -> list[Example]:
    """``n`` examples, tasks in round-robin so each task gets ``n / len(tasks)`` questions."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [
        make_example(split, scene_seed(split, seed, i), tasks[i % len(tasks)], max_objects)
        for i in range(n)
    ]


def make_multi(
    seed_value: int,
    n_questions: int,
    max_objects: int = MAX_OBJECTS,
    task_weights: dict[str, float] | None = None,
) -> tuple[Image.Image, list[tuple[str, str, str]], Scene]:
    """One training scene: ``(image, [(question, answer, task)], scene)``, up to ``n_questions``.

    Training packs several questions about one image into one multi-turn sequence, so the
    image tokens are paid for once per several supervised answers.
    """
    rng = np.random.default_rng(seed_value)
    weights = task_weights or {t: 1.0 for t in TASKS}
    names = [t for t in TASKS if weights.get(t, 0) > 0]
    p = np.array([weights[t] for t in names], dtype=np.float64)
    scene = scene_for(str(rng.choice(names, p=p / p.sum())), rng, max_objects)
    out: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for _ in range(3 * n_questions):
        task = str(rng.choice(names, p=p / p.sum()))
        qa = GENERATORS[task](scene, rng)
        if qa is not None and qa[0] not in seen:
            seen.add(qa[0])
            out.append((qa[0], qa[1], task))
        if len(out) == n_questions:
            break
    return render(scene), out, scene
