"""Stage 2's training sequences: several questions about one scene, packed behind a block mask.

A packed sequence is ``USER : <image> x 576`` then, per turn, ``question ASSISTANT : answer
</s>``. Every turn sees the image prefix and itself only, and its positions are shifted so that
it starts where a one-question prompt's question starts: each packed turn is computed exactly
as the one-question prompt the model answers at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pruneware.evals.synthetic.questions import GENERATORS, NUMBERS, PLURALS, QA
from pruneware.evals.synthetic.scene import Scene
from pruneware.models.grounding import cell_targets, phrases, referents

# Acceptance rates that bring the packed counting answers close to uniform over one..four
# (measured over 2000 train scenes of the stage-2 task mix).
COUNT_ACCEPT = {"one": 0.1, "two": 0.2, "three": 0.6}
GRID = 24
N_CELLS = GRID * GRID


def counting_balanced(scene: Scene, rng: np.random.Generator) -> QA | None:
    """A counting question whose answer is drawn uniformly from the counts the scene offers
    (the plain generator asks mostly about singletons: 65% of answers would be "one")."""
    by: dict[int, list[str]] = {}
    for kind in ("shape", "color"):
        values = [getattr(o, kind) for o in scene.objects]
        for v in set(values):
            q = f"how many {PLURALS[v]} are there?" if kind == "shape" else f"how many {v} objects are there?"
            by.setdefault(values.count(v), []).append(q)
    if not by:
        return None
    n = sorted(by)[rng.integers(len(by))]
    return by[n][rng.integers(len(by[n]))], NUMBERS[n]


def questions(scene: Scene, rng: np.random.Generator, n: int, weights: dict[str, float]) -> list[tuple[str, str, str]]:
    """Up to ``n`` distinct ``(question, answer, task)`` about ``scene``, tasks drawn by ``weights``."""
    names = [t for t, w in weights.items() if w > 0]
    p = np.array([weights[t] for t in names]) / sum(weights[t] for t in names)
    out, seen = [], set()
    for _ in range(4 * n):
        task = str(rng.choice(names, p=p))
        qa = (counting_balanced if task == "counting" else GENERATORS[task])(scene, rng)
        if qa is not None and task == "counting" and (qa[1] in seen or rng.random() > COUNT_ACCEPT.get(qa[1], 1.0)):
            continue  # one question per count and scene, and fewer singletons
        if qa is not None and qa[0] not in seen:
            seen.add(qa[1]) if task == "counting" else None
            seen.add(qa[0])
            out.append((qa[0], qa[1], task))
        if len(out) == n:
            break
    return out


@dataclass
class Packed:
    """One packed sample, unpadded. ``L`` is its length before background cells are dropped."""

    ids: torch.Tensor  # [L] token ids; image cells hold the image token id
    positions: torch.Tensor  # [L] shifted positions
    segment: torch.Tensor  # [L] -2 image prefix, k >= 0 turn k
    answer_at: torch.Tensor  # [Q] index of the first answer token of each turn
    cells: torch.Tensor  # [576, 5] cell labels (colour, shape, glyph, centre, object + 1)
    point: list[dict[str, list[int]]]  # per turn: pointing targets {"noun@i": cells, "answer": cells, "second": cells}
    tasks: list[str]


def _cells_of(cells: torch.Tensor, objects: list[int], kind: str) -> list[int]:
    on = torch.isin(cells[:, 4], torch.tensor(objects, dtype=torch.long) + 1)
    if kind == "glyph":
        on &= cells[:, 2] > 0
    elif kind == "center":
        on &= cells[:, 3] > 0
    return on.nonzero().flatten().tolist()


def pointing(scene: Scene, cells: torch.Tensor, question: str, task: str) -> dict[str, list[int]]:
    """Task-specific pointing targets (cell indices) of one question.

    ``noun@i``: the objects of the noun phrase ending at word ``i``; ``answer``: what the
    answering token should look at (glyph cells for glyph questions, object centres for
    counting, the first object for spatial, the referents otherwise); ``second``: the second
    object of a spatial question.
    """
    out = {f"noun@{i}": _cells_of(cells, objs, "object") for i, objs in phrases(scene, question)}
    if task == "spatial":
        (_, first), (_, second) = phrases(scene, question)[:2]
        out["answer"] = _cells_of(cells, first, "object")
        out["second"] = _cells_of(cells, second, "object")
    else:
        kind = {"glyph": "glyph", "counting": "center"}.get(task, "object")
        out["answer"] = _cells_of(cells, referents(scene, question), kind)
    return out


def pack(scene: Scene, qas: list[tuple[str, str, str]], vocab: dict[str, int]) -> Packed:
    """Token ids, positions and segments of ``qas`` about ``scene`` (LLaVA prompt layout)."""
    prefix = [vocab["USER"], vocab[":"]] + [vocab["<image>"]] * N_CELLS
    ids, positions, segment, answer_at = list(prefix), list(range(len(prefix))), [-2] * len(prefix), []
    cells = cell_targets(scene, GRID)
    point = []
    for k, (q, a, task) in enumerate(qas):
        words = q.replace("?", " ?").split() + ["ASSISTANT", ":", a, "</s>"]
        answer_at.append(len(ids) + len(words) - 2)
        ids += [vocab[w] for w in words]
        positions += range(len(prefix), len(prefix) + len(words))
        segment += [k] * len(words)
        point.append(pointing(scene, cells, q, task))
    return Packed(
        torch.tensor(ids), torch.tensor(positions), torch.tensor(segment), torch.tensor(answer_at),
        cells, point, [t for _, _, t in qas],
    )  # fmt: skip
