"""Stage 2's training sequences and batches: several questions about one scene, packed behind a block mask.

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
from pruneware.evals.synthetic.scene import COLORS, SHAPES, Scene
from pruneware.models.grounding import HEADS, cell_targets, phrases, referents

# Acceptance rates that bring the packed counting answers close to uniform over one..four
# (measured over 2000 train scenes of the stage-2 task mix).
COUNT_ACCEPT = {"one": 0.025, "two": 0.06, "three": 0.35}
POINT_KINDS = ("noun", "object", "answer", "second", "relation", "tally", "adjective", "via", "phrase_tally", "phrase_groups", "phrase_area", "phrase_contrast")
GROUPED_KINDS = ("phrase_groups", "phrase_area", "phrase_contrast")  # kinds whose items carry each column's object (``losses.point_loss``)
RELATION_WORDS = ("left", "right", "above", "below")  # the word that names a spatial relation
_COUNT_KIND = {"kind": "answer", "via": False, "head": False, "groups": False, "area": False, "colour": False, "contrast": False}  # counting's pointing; see use_count_*
SINK = -2  # the prompt's first token (``USER``), relative to the first image cell (column 0 in any layout)
GRID = 24
AREA_MEAN = 2.7  # about the mean log cell count of an object (radius 20-40 px on 14 px cells)
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
    positions: torch.Tensor  # [L] shifted positions ([L, 3] temporal / height / width for M-RoPE)
    segment: torch.Tensor  # [L] -2 image prefix, k >= 0 turn k
    answer_at: torch.Tensor  # [Q] index of the first answer token of each turn
    cells: torch.Tensor  # [576, 5] cell labels (colour, shape, glyph, centre, object + 1)
    point: list[dict[str, list[int]]]  # per turn: pointing targets {"noun@i": cells, "answer": cells, ...}
    tasks: list[str]
    aux: list[dict[str, list[float]]]  # per turn: probe targets (:func:`aux_targets`)
    image_at: int = 2  # index of the first image cell (``USER : <image>``; 3 in the Qwen layout)


def _cells_of(cells: torch.Tensor, objects: list[int], kind: str) -> list[int]:
    on = torch.isin(cells[:, 4], torch.tensor(objects, dtype=torch.long) + 1)
    if kind == "glyph":
        on &= cells[:, 2] > 0
    elif kind == "center":
        on &= cells[:, 3] > 0
    return on.nonzero().flatten().tolist()


def use_count_spread(on: bool) -> None:
    """Counting's pointing target becomes ``tally`` (equal shares, ``losses.SPREAD_KINDS``) when
    ``on``, else ``answer`` (any split between the centres and the sink); the ``--count-spread``
    option of stages 2 and 3."""
    _COUNT_KIND["kind"] = "tally" if on else "answer"


def use_count_via(on: bool) -> None:
    """When ``on``, a counting question's noun phrase (``objects`` in ``how many red objects``)
    points at its objects' centres plus the sink, as the answering token otherwise does, and the
    answering token reads the count from that word (``via``); the ``--count-via`` option."""
    _COUNT_KIND["via"] = on


def use_count_head(on: bool) -> None:
    """When ``on``, a counting question's noun phrase word also gets ``phrase_tally``: a dedicated
    head (``language.POINT``) spreads its attention equally over the referents' centre cells and the
    sink, so that head's sink share is exactly ``1 / (count + 1)`` whatever the objects' sizes; the
    ``--count-head`` option of stages 2 and 3."""
    _COUNT_KIND["head"] = on


def use_count_groups(on: bool) -> None:
    """When ``on`` (with :func:`use_count_head`), the tally head's target is ``phrase_groups``
    instead of ``phrase_tally``: an equal share for each referent *object* (summed over all its
    cells, wherever in the object the head looks) and the sink, rather than for each centre
    cell. A share on a cell next to the centre cell then counts as much as one on it, so the
    per-object total the count is read from is what is trained; the ``--count-groups`` option."""
    _COUNT_KIND["groups"] = on


def use_count_area(on: bool) -> None:
    """When ``on`` (with :func:`use_count_head`), the tally head's target is ``phrase_area``: every
    cell of each referent gets ``1 / (G * cells of its object)`` and the sink ``1 / G`` (``G``: the
    referents plus the sink), so an object's total is the same whatever its size; and the batch
    gets ``area`` probe targets (each object cell's log cell count, centred) so the visual tokens
    carry the size that share needs; the ``--count-area`` option."""
    _COUNT_KIND["area"] = on


def use_count_contrast(on: bool) -> None:
    """When ``on`` (with :func:`use_count_area`), the tally head also gets ``phrase_contrast``
    targets: every object cell of the scene, so that ``losses.contrast_loss`` can ask each
    referent's mean attention logit to beat each other object's by a margin (the area target
    alone barely penalises a small leak onto other objects); the ``--count-contrast`` option."""
    _COUNT_KIND["contrast"] = on


def use_count_at_colour(on: bool) -> None:
    """When ``on``, a counting question that names a colour counts at the colour word (``red`` in
    ``how many red objects are there ?``) instead of at ``objects``: the tally head's query is then
    the colour word's own embedding, with no colour carried to ``objects`` first, and the
    answer and the ``phrase_count`` probe read the count there; the ``--count-at-colour`` option."""
    _COUNT_KIND["colour"] = on


def count_word(question: str) -> int:
    """Index of the word a counting question counts at (``?`` is a word): its noun phrase's last
    word, or its colour word after :func:`use_count_at_colour`."""
    words = question.replace("?", " ?").split()
    if _COUNT_KIND["colour"] and words[2] in COLORS:
        return 2
    return words.index("are") - 1


def pointing(scene: Scene, cells: torch.Tensor, question: str, task: str) -> dict[str, list[int]]:
    """Task-specific pointing targets (cell indices) of one question.

    ``noun@i``: the objects of the noun phrase ending at word ``i`` (``object@i`` when that word
    is ``object(s)``, so the colour-keyed case can be weighted apart: ``losses.POINT_WEIGHTS``); ``answer``: what the
    answering token should look at (glyph cells for glyph questions, object centres for
    counting, the first object for spatial, the referents otherwise); ``second``: the second
    object of a spatial question. Counting also accepts the prompt's first token (``SINK``):
    attention that sits wholly on the object centres averages them and so cannot tell one from
    four; the share left on a fixed sink token is what carries the count. After
    :func:`use_count_spread` counting's target is ``tally`` instead (same cells, an equal share
    each: the sink then holds exactly ``1 / (count + 1)``; ``losses.SPREAD_KINDS``).
    """
    words = question.replace("?", " ?").split()
    tally = task == "counting" and _COUNT_KIND["via"]
    out = {
        f"{'object' if words[i] in ('object', 'objects') else 'noun'}@{i}":
            _cells_of(cells, objs, "center") + [SINK] if tally else _cells_of(cells, objs, "object")
        for i, objs in phrases(scene, question)
    }  # fmt: skip
    if task == "counting" and _COUNT_KIND["head"]:
        objs = phrases(scene, question)[0][1]
        i = count_word(question)
        if _COUNT_KIND["area"]:
            out[f"phrase_area@{i}"] = _cells_of(cells, objs, "object") + [SINK]
            if _COUNT_KIND["contrast"]:
                out[f"phrase_contrast@{i}"] = _cells_of(cells, list(range(len(scene.objects))), "object")
        elif _COUNT_KIND["groups"]:
            out[f"phrase_groups@{i}"] = _cells_of(cells, objs, "object") + [SINK]
        else:
            out[f"phrase_tally@{i}"] = _cells_of(cells, objs, "center") + [SINK]
    if task == "spatial":
        (_, first), (_, second) = phrases(scene, question)[:2]
        out["answer"] = _cells_of(cells, first, "object")
        out["second"] = _cells_of(cells, second, "object")
    else:
        kind = {"glyph": "glyph", "counting": "center"}.get(task, "object")
        out["answer"] = _cells_of(cells, referents(scene, question), kind) + ([SINK] if task == "counting" else [])
        if task == "counting":
            out[_COUNT_KIND["kind"]] = out.pop("answer")
    return out


def word_links(question: str, task: str, first: int) -> dict[str, list[int]]:
    """Pointing targets between a question's own words; ``first`` is the column of its first
    word relative to the first image cell.

    ``relation`` (spatial): the answering token looks at the relation word. ``adjective@i``: the
    noun phrase's last word ``i`` looks at its colour word (``red`` in ``the red object``), to
    carry the colour to the word that then points at the objects. On ground-truth cells the link
    is learned (0.98 of the attention) but ``object`` still looks at the red objects with only
    0.40-0.44 of its attention (0.35 before): see the tiny-llava card, "colour-keyed attention".
    ``via`` (attribute): the answering token looks at the noun phrase's last word, which has
    looked the object up already, instead of repeating the colour-keyed lookup itself; for
    ``what shape is the red object?`` the answering head's target (``answer``) is that word too.
    With cell targets, that head spread over all objects (0.33 on the red one) and the errors
    named another object's shape, while a probe read the right shape at ``object`` every time.
    """
    words = question.replace("?", " ?").split()
    out = {f"adjective@{i + 1}": [first + i] for i, w in enumerate(words[:-1]) if w in COLORS}  # colours are adjectives here
    if task == "spatial":
        out["relation"] = [first + next(i for i, w in enumerate(words) if w in RELATION_WORDS)]
    if task == "attribute":  # ``via``: the answering token reads the object from the phrase's last word
        out["via"] = [first + len(words) - 2]  # ``what shape is the red object ?``: ``object``
        if words[1] == "shape":  # and the answering head too, not the red object's cells (they mislead it)
            out["answer"] = out["via"]
    if task == "counting" and _COUNT_KIND["via"]:  # ``how many red objects are there ?``: ``objects``
        out["via"] = [first + count_word(question)]
        if words[3] == "objects":  # the colour case: the answering head reads the count there too
            out[_COUNT_KIND["kind"]] = out["via"]
    return out


def aux_targets(scene: Scene, question: str, task: str) -> dict[str, list[float]]:
    """Targets that linear probes read from the answering row (see ``language.PROBES``), or,
    for ``kind@i``, from word ``i`` of the question.

    ``rel`` (spatial): one-hot over ``RELATION_WORDS``; ``order`` (spatial): how far the
    relation holds, in quarter-image units, e.g. for ``a left of b`` it is ``(b.x - a.x) / 84``
    (the answer is "yes" exactly when it is > 0); ``count`` (counting): referents minus 2.5;
    ``lookup@i`` ("what shape is the red object?"): the red object's shape, one-hot over
    ``SHAPES``, at ``object``; ``phrase_count@i`` (counting, with :func:`use_count_via`): the count at
    the noun phrase's last word.
    """
    if task == "counting":
        out = {"count": [len(referents(scene, question)) - 2.5]}
        if _COUNT_KIND["via"]:  # the noun phrase holds the count too
            out[f"phrase_count@{count_word(question)}"] = out["count"]
        return out
    if task == "attribute" and question.startswith("what shape"):  # the phrase word holds the shape it looked up
        (i, (o,)), = phrases(scene, question)
        return {f"lookup@{i}": [float(s == scene.objects[o].shape) for s in SHAPES]}
    if task != "spatial":
        return {}
    (_, first), (_, second) = phrases(scene, question)[:2]  # one object each: descriptions are unique
    a, b = scene.objects[first[0]], scene.objects[second[0]]
    d = {"left": b.x - a.x, "right": a.x - b.x, "above": b.y - a.y, "below": a.y - b.y}
    word = next(w for w in RELATION_WORDS if f" {w} " in f" {question} ")
    return {"order": [d[word] / 84.0], "rel": [float(w == word) for w in RELATION_WORDS]}


def pack(scene: Scene, qas: list[tuple[str, str, str]], vocab: dict[str, int]) -> Packed:
    """Token ids, positions and segments of ``qas`` about ``scene`` (LLaVA prompt layout)."""
    prefix = [vocab["USER"], vocab[":"]] + [vocab["<image>"]] * N_CELLS
    ids, positions, segment, answer_at = list(prefix), list(range(len(prefix))), [-2] * len(prefix), []
    cells = cell_targets(scene, GRID)
    point, aux = [], []
    for k, (q, a, task) in enumerate(qas):
        words = q.replace("?", " ?").split() + ["ASSISTANT", ":", a, "</s>"]
        answer_at.append(len(ids) + len(words) - 2)
        point.append(pointing(scene, cells, q, task))
        aux.append(aux_targets(scene, q, task))
        point[-1].update(word_links(q, task, len(ids) - 2))
        ids += [vocab[w] for w in words]
        positions += range(len(prefix), len(prefix) + len(words))
        segment += [k] * len(words)
    return Packed(
        torch.tensor(ids), torch.tensor(positions), torch.tensor(segment), torch.tensor(answer_at),
        cells, point, [t for _, _, t in qas], aux,
    )  # fmt: skip


def noisy(cells: torch.Tensor, rate: float, gen: torch.Generator) -> torch.Tensor:
    """Replace each object cell's colour / shape / glyph label by a random one with prob ``rate``."""
    out = cells.clone()
    obj = cells[:, 4] > 0
    for k, n in enumerate(list(HEADS.values())[:3]):
        flip = obj & (torch.rand(len(cells), generator=gen) < rate)
        out[flip, k] = torch.randint(1, n, (int(flip.sum()),), generator=gen)
    return out


def bg_keep(step: int, steps: int) -> float:
    """Fraction of background cells kept: 5% for the first 15% of steps, all from 40% on
    (counting is learned on the full set: it needs the background as a reference)."""
    f = step / max(steps, 1)
    return 0.05 if f < 0.15 else min(1.0, 0.05 + 0.95 * (f - 0.15) / 0.25)


def collate(samples: list[Packed], keep_bg: float, gen: torch.Generator, label_noise: float):
    """Right-padded batch with background cells dropped: ids [B, L], cell labels [B, L, 5], cell
    indices [B, L], is-cell [B, L], positions [B, L], mask [B, 1, L, L], answer columns per
    sample, and targets: per pointing kind ``(sample, row, columns)`` (``GROUPED_KINDS`` add each
    column's group: ``(sample, row, columns, groups)``); ``where``: ``(sample, row,
    [4])`` the row/column centroids of both objects of a spatial question, scaled to [0, 1];
    ``rel`` / ``order`` / ``count``: ``(sample, row, [k])`` from :func:`aux_targets`. Pointing columns are
    relative to the first image cell (negative ones are prompt tokens before the image)."""
    rows_kept = []
    for s in samples:
        image = (s.ids == s.ids[s.image_at]).nonzero().flatten()  # [576] image cell columns
        bg = s.cells[:, 4] == 0
        drop = bg & (torch.rand(N_CELLS, generator=gen) >= keep_bg)
        keep = torch.ones(len(s.ids), dtype=torch.bool)
        keep[image[drop]] = False
        rows_kept.append(keep.nonzero().flatten())
    n = max(len(k) for k in rows_kept)
    b = len(samples)
    ids = torch.zeros(b, n, dtype=torch.long)
    pos = torch.zeros(b, n, *samples[0].positions.shape[1:], dtype=torch.long)
    seg = torch.full((b, n), -1, dtype=torch.long)
    cells = torch.zeros(b, n, 5, dtype=torch.long)
    is_cell = torch.zeros(b, n, dtype=torch.bool)
    index = torch.zeros(b, n, dtype=torch.long)
    where = torch.full((b, max(len(s.ids) for s in samples)), -1, dtype=torch.long)  # old -> new column
    for i, (s, k) in enumerate(zip(samples, rows_kept, strict=True)):
        ids[i, : len(k)], pos[i, : len(k)], seg[i, : len(k)] = s.ids[k], s.positions[k], s.segment[k]
        where[i, k] = torch.arange(len(k))
        first = s.image_at
        cell_of = k - first
        on = (cell_of >= 0) & (cell_of < N_CELLS)
        is_cell[i, : len(k)] = on
        index[i, : len(k)][on] = cell_of[on]
        labels = noisy(s.cells, label_noise, gen) if label_noise > 0 else s.cells
        cells[i, : len(k)][on] = labels[cell_of[on]]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0)
    mask = (causal & (same | (seg[:, None, :] == -2))) | torch.eye(n, dtype=torch.bool)
    answers, targets = [], {k: [] for k in POINT_KINDS}
    targets.update(where=[], rel=[], order=[], count=[])
    for i, s in enumerate(samples):
        first = s.image_at
        if _COUNT_KIND["area"]:  # every object cell: its object's log cell count, centred
            obj = s.cells[:, 4]
            log_size = torch.bincount(obj, minlength=int(obj.max()) + 1).float().log() - AREA_MEAN  # [objects + 1]
            on = (obj > 0).nonzero().flatten()  # [k] object cells
            rows = where[i, on + first]
            kept = rows >= 0
            targets.setdefault("area", []).extend(zip([i] * int(kept.sum()), rows[kept].tolist(), log_size[obj[on[kept]]][:, None]))
        turn_start = [int((s.segment == k).nonzero()[0]) for k in range(len(s.tasks))]

        def row_of(turn: int, word: str, i=i, s=s, turn_start=turn_start) -> int:
            """New column of turn ``turn``'s answering row, or of its question word ``word``."""
            return int(where[i, s.answer_at[turn] - 1]) if not word else int(where[i, turn_start[turn] + int(word)])
        answers.append(where[i, s.answer_at])
        for j, point in enumerate(s.point):
            for name, value in s.aux[j].items():
                kind, _, word = name.partition("@")
                targets.setdefault(kind, []).append((i, row_of(j, word), torch.tensor(value)))
            if point.get("second"):  # spatial: where both objects are, for the answering row
                rc = [torch.tensor(point[k]) for k in ("answer", "second")]
                where_ = torch.stack([torch.stack([(c // GRID).float().mean(), (c % GRID).float().mean()]) for c in rc]).flatten() / (GRID - 1)
                targets["where"].append((i, int(where[i, s.answer_at[j] - 1]), where_))
            for name, cols in point.items():
                kind, _, word = name.partition("@")
                row = row_of(j, word)
                absolute = torch.tensor([0 if c == SINK else c + first for c in cols], dtype=torch.long)  # SINK: column 0
                new = where[i, absolute] if cols else torch.empty(0, dtype=torch.long)
                if kind in GROUPED_KINDS:  # each column's group: its object + 1 (0 for the sink)
                    group = torch.tensor([0 if c == SINK else int(s.cells[c, 4]) for c in cols], dtype=torch.long)
                    targets[kind].append((i, row, new[new >= 0], group[new >= 0]))
                else:
                    targets[kind].append((i, row, new[new >= 0]))
    return ids, cells, index, is_cell, pos, mask[:, None], answers, targets
