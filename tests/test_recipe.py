"""The staged tiny-model recipe (recipes/tiny_models): packing, pointing targets, checkpoints."""

from __future__ import annotations

import pytest
import torch

from pruneware.evals.synthetic.scene import COLORS
from pruneware.models.build import build_tiny, build_tokenizer
from recipes.tiny_models.common import load_checkpoint, save_checkpoint, save_hf_folder
from recipes.tiny_models.language import Stage2, train_batch
from recipes.tiny_models.packing import collate
from recipes.tiny_models.packing import N_CELLS, pack
from recipes.tiny_models.vision import VISION_SPEC

VOCAB = build_tokenizer("llava").get_vocab()


def _net():
    model, _ = build_tiny("llava", seed=0, vision=VISION_SPEC)
    torch.manual_seed(0)
    return Stage2(model).eval()


def _answer_logits(net, packs):
    ids, cells, index, is_cell, pos, mask, answers, _ = collate(packs, 1.0, torch.Generator(), 0.0)
    with torch.no_grad():
        hidden = net(ids, cells, index, is_cell, pos, mask)
    return [net.head(hidden[i, a - 1]) for i, a in enumerate(answers)]  # [Q, V] per sample


def test_packed_turns_equal_one_question_prompts():
    net = _net()
    packs, scenes = train_batch("test", 0, 3, 2, 4, VOCAB)
    packed = _answer_logits(net, packs)
    for i, (p, scene) in enumerate(zip(packs, scenes, strict=True)):
        qas = [(_question_of(p, k), None, p.tasks[k]) for k in range(len(p.tasks))]
        for k, (q, _, task) in enumerate(qas):
            answer = [w for w, t in VOCAB.items() if t == int(p.ids[p.answer_at[k]])][0]
            single = _answer_logits(net, [pack(scene, [(q, answer, task)], VOCAB)])[0][0]
            torch.testing.assert_close(packed[i][k], single, atol=1e-5, rtol=1e-4)


def _question_of(p, k: int) -> str:
    """The question text of turn ``k`` of packed sample ``p``, rebuilt from its token ids."""
    inv = {v: w for w, v in VOCAB.items()}
    words = [inv[int(t)] for t in p.ids[p.segment == k]][:-4]  # drop "ASSISTANT : answer </s>"
    return " ".join(words).replace(" ?", "?")


def test_pointing_targets_are_object_cells_and_the_right_rows():
    packs, _ = train_batch("test", 0, 5, 6, 6, VOCAB)  # 6 images: the batch then holds a counting question
    ids, cells, _, is_cell, _, _, answers, targets = collate(packs, 0.05, torch.Generator().manual_seed(0), 0.0)
    inv = {v: w for w, v in VOCAB.items()}
    assert targets["answer"] and targets["noun"]
    for i, row, cols in targets["answer"] + targets["second"]:
        assert inv[int(ids[i, row])] == ":" and inv[int(ids[i, row - 1])] == "ASSISTANT"
        if len(cols) and inv[int(ids[i, cols[0]])] == "object":  # "what shape is the red object?": that word (via)
            assert len(cols) == 1 and targets["via"] and any(int(c[0]) == int(cols[0]) for *_, c in targets["via"])
            continue
        objects = cols[cols > 0]  # column 0 is the counting sink, the prompt's first token
        assert is_cell[i, objects].all() and (cells[i, objects, 4] > 0).all()
        assert (cols[cols == 0].numel() == 0) or inv[int(ids[i, 0])] == "USER"
    assert targets["relation"] and targets["order"] and targets["count"]
    for i, row, cols in targets["relation"]:  # spatial: from the answering row to "left of", "above", ...
        assert inv[int(ids[i, row])] == ":"
        assert [inv[int(c)] for c in ids[i, cols]] in (["left"], ["right"], ["above"], ["below"])
    for i, row, value in targets["count"]:
        assert inv[int(ids[i, row + 1])] == ["one", "two", "three", "four"][int(value + 2.5) - 1]
    assert targets["adjective"]  # "red object": from the noun's row to its colour word
    for i, row, cols in targets["adjective"]:
        assert [int(c) for c in cols] == [row - 1] and inv[int(ids[i, row - 1])] in COLORS
    assert targets["object"]
    for i, row, cols in targets["object"]:  # "the red object": weighted apart (losses.POINT_WEIGHTS)
        assert inv[int(ids[i, row])] in ("object", "objects") and inv[int(ids[i, row - 1])] in COLORS
        assert len(cols) and (cells[i, cols, 4] > 0).all()
    for i, row, cols in targets["noun"]:
        assert inv[int(ids[i, row])] in {"circle", "square", "triangle", "star", "cross", "circles", "squares",
                                          "triangles", "stars", "crosses"}  # fmt: skip
    # background dropping keeps every object cell and few background cells
    for i, p in enumerate(packs):
        kept_cells = int(is_cell[i].sum())
        assert int((p.cells[:, 4] > 0).sum()) <= kept_cells < N_CELLS


def test_checkpoint_round_trip_restores_weights_and_optimizer(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.ones(4, 3)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, {"net": net}, opt, {"step": 7})
    again = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(again.parameters())
    assert load_checkpoint(tmp_path, {"net": again}, opt2) == {"step": 7}
    torch.testing.assert_close(again.weight, net.weight, rtol=0, atol=0)
    a, b = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    torch.testing.assert_close(a["exp_avg"], b["exp_avg"], rtol=0, atol=0)


def test_qwen_layout_matches_the_processor_and_hf_rope_index():
    """tiny-qwen2.5-vl's stage-2 layout: a one-question pack has the real prompt's token ids
    and the M-RoPE positions transformers computes for it; packed turns equal one-question packs."""
    from pruneware.evals.synthetic import render
    from pruneware.models import prompt
    from recipes.tiny_models.qwen_language import Stage2Qwen, pack_qwen
    from recipes.tiny_models.qwen_vision import build_qwen

    model, processor = build_qwen(0)
    vocab = processor.tokenizer.get_vocab()
    packs, scenes = train_batch("test", 0, 3, 2, 4, vocab, pack_qwen)
    p, scene = packs[0], scenes[0]
    inv = {v: w for w, v in vocab.items()}
    q = " ".join(inv[int(t)] for t in p.ids[p.segment == 0][:-5]).replace(" ?", "?")
    answer = inv[int(p.ids[p.answer_at[0]])]
    one = pack_qwen(scene, [(q, answer, p.tasks[0])], vocab)
    inputs = processor(text=[prompt("tiny-qwen2.5-vl", q)], images=[render(scene)], return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    assert one.ids[:n].tolist() == inputs["input_ids"][0].tolist() and int(one.answer_at[0]) == n
    hf, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"])
    assert torch.equal(one.positions[:n].T, hf[:, 0])
    torch.manual_seed(0)
    net = Stage2Qwen(model).eval()
    packed = _answer_logits(net, [p])[0]
    for k in range(len(p.tasks)):
        q = " ".join(inv[int(t)] for t in p.ids[p.segment == k][:-5]).replace(" ?", "?")
        single = _answer_logits(net, [pack_qwen(scene, [(q, inv[int(p.ids[p.answer_at[k]])], p.tasks[k])], vocab)])[0][0]
        torch.testing.assert_close(packed[k], single, atol=1e-5, rtol=1e-4)


def test_count_spread_moves_counting_to_the_equal_share_target():
    from recipes.tiny_models.packing import use_count_spread

    try:
        use_count_spread(True)
        packs, _ = train_batch("test", 0, 5, 6, 6, VOCAB)
        *_, targets = collate(packs, 1.0, torch.Generator().manual_seed(0), 0.0)
        assert targets["tally"] and all(int(cols[-1]) == 0 for _, _, cols in targets["tally"])  # the sink
        assert len(targets["answer"]) + len(targets["tally"]) == sum(len(p.tasks) for p in packs)
    finally:
        use_count_spread(False)


def test_via_points_from_the_answer_to_the_phrase_word():
    """Attribute questions: the answering token looks at the noun phrase's last word."""
    packs, _ = train_batch("test", 0, 5, 6, 6, VOCAB)
    ids, *_, targets = collate(packs, 1.0, torch.Generator().manual_seed(0), 0.0)
    inv = {v: w for w, v in VOCAB.items()}
    n_attribute = sum(t == "attribute" for p in packs for t in p.tasks)
    assert n_attribute and len(targets["via"]) == n_attribute
    for i, row, cols in targets["via"]:
        assert inv[int(ids[i, row])] == ":" and len(cols) == 1
        assert inv[int(ids[i, cols[0]])] in {"object", "circle", "square", "triangle", "star", "cross"}
        assert inv[int(ids[i, cols[0] + 1])] == "?"


def _repacked_with(switch):
    """A train batch packed again with ``switch(True)`` (e.g. ``use_count_via``) in force:
    ``(packs, scenes, ids, cells, targets)`` of the collated batch; the switch is reset after."""
    packs, scenes = train_batch("test", 0, 5, 6, 6, VOCAB)
    inv = {v: w for w, v in VOCAB.items()}
    try:
        switch(True)
        packs = [pack(s, [(_question_of(p, k), inv[int(p.ids[p.answer_at[k]])], p.tasks[k]) for k in range(len(p.tasks))], VOCAB)
                 for p, s in zip(packs, scenes, strict=True)]  # fmt: skip
        ids, cells, *_, targets = collate(packs, 1.0, torch.Generator().manual_seed(0), 0.0)
    finally:
        switch(False)
    return packs, scenes, ids, cells, targets


def test_count_via_moves_counting_to_the_noun_phrase():
    """With --count-via a counting phrase points at its centres plus the sink, and the answer at it."""
    from recipes.tiny_models.packing import use_count_via

    packs, scenes, ids, cells, targets = _repacked_with(use_count_via)
    inv = {v: w for w, v in VOCAB.items()}
    count_rows = {(i, int(r)) for i, r, _ in targets["count"]}  # the row before each counting answer
    via = [(i, row, cols) for i, row, cols in targets["via"] if (i, row) in count_rows]
    assert via and len(via) == len(count_rows)
    phrase_rows = {(i, int(c[0])) for i, _, c in via}
    for i, row, cols in targets["noun"] + targets["object"]:
        if (i, row) in phrase_rows:  # "stars" / "red objects": the centres, then the sink (column 0)
            assert int(cols[-1]) == 0 and (cells[i, cols[:-1], 3] > 0).all()
            assert inv[int(ids[i, row + 1])] == "are"
    scene = next(s for s in scenes if s.objects)  # "how many red objects?": the answer reads "objects"
    color = scene.objects[0].color
    n = sum(o.color == color for o in scene.objects)
    try:
        use_count_via(True)
        one = pack(scene, [(f"how many {color} objects are there?", ["one", "two", "three", "four"][n - 1], "counting")], VOCAB)
    finally:
        use_count_via(False)
    ids, *_, targets = collate([one], 1.0, torch.Generator().manual_seed(0), 0.0)
    ((_, row, cols),) = targets["answer"]
    assert inv[int(ids[0, row])] == ":" and [inv[int(ids[0, c])] for c in cols] == ["objects"]


def test_count_head_tallies_centres_and_sink_at_the_noun_phrase():
    """With --count-head each counting question's noun phrase word gets an equal-share target
    over its referents' centre cells and the sink (column 0), one centre per object."""
    from pruneware.models.grounding import referents
    from recipes.tiny_models.losses import SPREAD_KINDS
    from recipes.tiny_models.packing import use_count_head

    packs, scenes, ids, cells, targets = _repacked_with(use_count_head)
    inv = {v: w for w, v in VOCAB.items()}
    assert "phrase_tally" in SPREAD_KINDS
    n_counting = sum(t == "counting" for p in packs for t in p.tasks)
    assert n_counting and len(targets["phrase_tally"]) == n_counting
    counts = iter(
        len(referents(s, _question_of(p, k))) for p, s in zip(packs, scenes, strict=True) for k, t in enumerate(p.tasks) if t == "counting"
    )  # fmt: skip
    for i, row, cols in targets["phrase_tally"]:
        assert inv[int(ids[i, row + 1])] == "are"  # "how many red objects are there ?": the phrase word
        assert int(cols[-1]) == 0 and (cells[i, cols[:-1], 3] == 1).all()
        assert len(cols) - 1 == next(counts)  # one centre cell per referent


def test_spread_point_loss_is_the_kl_from_equal_shares():
    """The equal-share pointing loss against a hand computation of KL(uniform || attention)."""
    from recipes.tiny_models.losses import point_loss

    attn, h, kwargs = _one_head_inputs()
    cols = torch.tensor([0, 2, 3])
    got = point_loss(attn, (), kwargs, 0, [(0, 5, cols)], 1, spread=True)
    q, k = attn.q_proj(h)[0, 5], attn.k_proj(h)[0]
    p = ((k @ q) * attn.scaling).softmax(-1)
    want = sum((1 / 3) * torch.log((1 / 3) / p[c]) for c in cols)
    torch.testing.assert_close(got, want)
    mass = point_loss(attn, (), kwargs, 0, [(0, 5, cols)], 1)
    torch.testing.assert_close(mass, -torch.log(p[cols].sum()))


def test_count_groups_tally_each_referent_object_and_the_sink():
    """With --count-head --count-groups the tally head's target holds every cell of each referent
    (grouped by object) plus the sink (group 0): one group per referent and one for the sink."""
    from pruneware.models.grounding import referents
    from recipes.tiny_models.packing import use_count_groups, use_count_head

    def both(on: bool) -> None:
        use_count_head(on)
        use_count_groups(on)

    packs, scenes, ids, cells, targets = _repacked_with(both)
    assert not targets["phrase_tally"]
    counts = iter(
        len(referents(s, _question_of(p, k))) for p, s in zip(packs, scenes, strict=True) for k, t in enumerate(p.tasks) if t == "counting"
    )  # fmt: skip
    assert targets["phrase_groups"]
    for i, row, cols, groups in targets["phrase_groups"]:
        assert int(cols[-1]) == 0 and int(groups[-1]) == 0  # the sink
        assert (cells[i, cols[:-1], 4] == groups[:-1]).all() and (groups[:-1] > 0).all()
        assert len(groups.unique()) - 1 == next(counts)
        assert len(cols) - 1 > len(groups.unique()) - 1  # objects span several cells


def test_grouped_point_loss_is_the_kl_from_equal_group_totals():
    """The grouped loss against KL(uniform over groups || attention summed per group): the split
    inside a group does not matter, only each group's total."""
    from recipes.tiny_models.losses import grouped_spread, point_loss

    attn, h, kwargs = _one_head_inputs()
    cols, groups = torch.tensor([0, 2, 3, 4]), torch.tensor([0, 7, 7, 9])
    got = point_loss(attn, (), kwargs, 0, [(0, 5, cols, groups)], 1)
    q, k = attn.q_proj(h)[0, 5], attn.k_proj(h)[0]
    p = ((k @ q) * attn.scaling).softmax(-1)
    totals = [p[0], p[2] + p[3], p[4]]
    want = sum((1 / 3) * torch.log((1 / 3) / t) for t in totals)
    torch.testing.assert_close(got, want)
    equal = torch.log(torch.tensor([[1 / 3, 0.0, 0.05, 1 / 3 - 0.05, 1 / 3, 0.0]]).clamp_min(1e-30))
    torch.testing.assert_close(grouped_spread(equal, [(0, 5, cols, groups)]), torch.tensor(0.0), atol=1e-6, rtol=0)
    skewed = torch.log(torch.tensor([[0.2, 0.0, 0.3, 0.3, 0.2, 0.0]]).clamp_min(1e-30))
    assert grouped_spread(skewed, [(0, 5, cols, groups)]) > 0.05


def test_count_area_spreads_each_referent_evenly_and_probes_object_sizes():
    """With --count-head --count-area: the tally target is every referent cell plus the sink,
    grouped by object; its loss is KL from ``1 / (G * size)`` per cell; and each object cell of
    the batch gets its object's centred log cell count as an ``area`` probe target."""
    import math

    from recipes.tiny_models.losses import area_spread
    from recipes.tiny_models.packing import AREA_MEAN, use_count_area, use_count_head

    def both(on: bool) -> None:
        use_count_head(on)
        use_count_area(on)

    packs, scenes, ids, cells, targets = _repacked_with(both)
    assert targets["phrase_area"] and not targets["phrase_tally"]
    for i, row, cols, groups in targets["phrase_area"]:
        assert int(cols[-1]) == 0 and int(groups[-1]) == 0
        assert (cells[i, cols[:-1], 4] == groups[:-1]).all()
    n_object_cells = int((cells[..., 4] > 0).sum())
    assert len(targets["area"]) == n_object_cells
    for i, col, value in targets["area"][:50]:
        size = int((cells[i, :, 4] == cells[i, col, 4]).sum())
        assert math.isclose(float(value), math.log(size) - AREA_MEAN, rel_tol=1e-5)
    cols, groups = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 5, 5, 5])
    even = torch.tensor([[0.5, 1 / 6, 1 / 6, 1 / 6]]).log()
    torch.testing.assert_close(area_spread(even, [(0, 3, cols, groups)]), torch.tensor(0.0), atol=1e-6, rtol=0)
    lumpy = torch.tensor([[0.5, 0.5, 0.0, 0.0]]).clamp_min(1e-30).log()  # right total, not spread
    assert area_spread(lumpy, [(0, 3, cols, groups)]) > 1.0


def test_count_contrast_targets_every_object_and_asks_referents_to_lead_by_a_margin():
    """With --count-area --count-contrast: a ``phrase_contrast`` item at the tally row covers every
    object cell of the scene, grouped by object (its referents are the ``phrase_area`` groups);
    its loss is ``softplus(margin - gap)`` averaged over (referent, other) pairs of objects'
    mean log-attention, near 0 once every referent leads by far more than the margin."""
    from recipes.tiny_models.losses import CONTRAST_MARGIN, contrast_loss
    from recipes.tiny_models.packing import use_count_area, use_count_contrast, use_count_head

    def three(on: bool) -> None:
        use_count_head(on)
        use_count_area(on)
        use_count_contrast(on)

    packs, scenes, ids, cells, targets = _repacked_with(three)
    area = {(i, row): set(g.tolist()) - {0} for i, row, _, g in targets["phrase_area"]}
    assert targets["phrase_contrast"] and len(targets["phrase_contrast"]) == len(targets["phrase_area"])
    for i, row, cols, groups in targets["phrase_contrast"]:
        assert (i, row) in area and area[(i, row)] <= set(groups.tolist())
        assert set(cols.tolist()) == set((cells[i, :, 4] > 0).nonzero().flatten().tolist())
        assert (cells[i, cols, 4] == groups).all()
    cols, groups = torch.tensor([1, 2, 3, 4]), torch.tensor([1, 1, 2, 3])  # object 1 is the referent
    rivals = {(0, 5): {1}}
    lead = torch.tensor([[0.0, -1.0, -1.0, -9.0, -11.0]])  # referent -1, others -9 and -11: gaps 8 and 10
    far = torch.nn.functional.softplus(CONTRAST_MARGIN - torch.tensor([8.0, 10.0])).mean()
    torch.testing.assert_close(contrast_loss(lead, [(0, 5, cols, groups)], rivals), far)
    assert far < 0.02
    level = torch.tensor([[0.0, -3.0, -3.0, -3.0, -3.0]])  # no lead: softplus(margin)
    torch.testing.assert_close(contrast_loss(level, [(0, 5, cols, groups)], rivals), torch.nn.functional.softplus(torch.tensor(CONTRAST_MARGIN)))
    assert contrast_loss(level, [(0, 5, cols, groups)], {(0, 5): {1, 2, 3}}) == 0  # no other object: no term


def test_count_at_colour_moves_the_colour_case_to_the_colour_word():
    """With --count-at-colour, "how many red objects are there?" tallies, is read and is probed
    at ``red``; "how many stars are there?" stays at ``stars``."""
    from recipes.tiny_models.packing import use_count_at_colour, use_count_head, use_count_via

    scene = train_batch("test", 0, 1, 6, 6, VOCAB)[1][0]
    color, shape = scene.objects[0].color, scene.objects[0].shape
    n_color = sum(o.color == color for o in scene.objects)
    n_shape = sum(o.shape == shape for o in scene.objects)
    words = ["one", "two", "three", "four"]
    from pruneware.evals.synthetic.scene import PLURALS

    qas = [(f"how many {color} objects are there?", words[n_color - 1], "counting"),
           (f"how many {PLURALS[shape]} are there?", words[n_shape - 1], "counting")]  # fmt: skip
    switches = (use_count_via, use_count_head, use_count_at_colour)
    try:
        for switch in switches:
            switch(True)
        one = pack(scene, qas, VOCAB)
    finally:
        for switch in switches:
            switch(False)
    ids, *_, targets = collate([one], 1.0, torch.Generator().manual_seed(0), 0.0)
    inv = {v: w for w, v in VOCAB.items()}
    tally_words = [inv[int(ids[0, row])] for _, row, _ in targets["phrase_tally"]]
    assert tally_words == [color, PLURALS[shape]]
    count_words = [inv[int(ids[0, row])] for _, row, _ in targets["phrase_count"]]
    assert count_words == [color, PLURALS[shape]]
    via_words = [inv[int(ids[0, c])] for _, _, cols in targets["via"] for c in cols]
    assert via_words == [color, PLURALS[shape]]
    _, _, cols = targets["answer"][0]  # the colour case's answering head reads the colour word
    assert [inv[int(ids[0, c])] for c in cols] == [color]


def _one_head_inputs():
    """A 1-sequence, 6-token causal input for :func:`point_loss`: ``(attn, hidden [1, 6, 8], kwargs)``."""
    torch.manual_seed(0)
    b, n, d = 1, 6, 4
    attn = _Attn(8, d)
    h = torch.randn(b, n, 8)
    mask = torch.ones(b, 1, n, n, dtype=torch.bool).tril()
    return attn, h, {"hidden_states": h, "position_embeddings": (None, None), "attention_mask": mask}


def apply_rotary_pos_emb(q, k, cos, sin):
    """No rotation: point_loss looks this up in the attention module's own module."""
    return q, k


class _Attn(torch.nn.Module):
    """The attributes point_loss reads from an HF attention module."""

    def __init__(self, width: int, head_dim: int):
        super().__init__()
        self.head_dim, self.scaling = head_dim, head_dim**-0.5
        self.q_proj, self.k_proj = torch.nn.Linear(width, head_dim), torch.nn.Linear(width, head_dim)


def test_point_weights_scale_their_kind_and_reject_unknown_kinds():
    from recipes.tiny_models import losses

    try:
        losses.set_point_weights("object=10", ("noun", "object"))
        assert losses.POINT_WEIGHTS == {"object": 10.0}
        with pytest.raises(SystemExit, match="valid kinds"):
            losses.set_point_weights("colour=2", ("noun", "object"))
    finally:
        losses.POINT_WEIGHTS.clear()


def test_count_accept_and_scene_mix_rebalance_counting_answers():
    """The joint phase's --scene-mix / --count-accept: fewer small counts, more "four" (the
    evaluation split asks about one..four about equally; the default training mix does not)."""
    import collections

    from recipes.tiny_models import language, packing

    def counts() -> collections.Counter:
        packs, _ = train_batch("joint", 0, 0, 40, 16, VOCAB)
        words = {i: w for w, i in VOCAB.items()}
        return collections.Counter(words[int(p.ids[a])] for p in packs for a, t in zip(p.answer_at, p.tasks) if t == "counting")

    saved_scene, saved_accept = dict(language.SCENE_MIX), dict(packing.COUNT_ACCEPT)
    try:
        before = counts()
        language.apply_mix("counting=15", language.SCENE_MIX, "--scene-mix")
        language.apply_mix("one=0.006,two=0.015,three=0.1", packing.COUNT_ACCEPT, "--count-accept")
        after = counts()
        assert after["four"] / sum(after.values()) > before["four"] / sum(before.values()) + 0.05, (before, after)
        with pytest.raises(SystemExit, match="valid keys"):
            language.apply_mix("five=1", packing.COUNT_ACCEPT, "--count-accept")
    finally:
        language.SCENE_MIX.update(saved_scene)
        packing.COUNT_ACCEPT.clear()
        packing.COUNT_ACCEPT.update(saved_accept)


@pytest.mark.parametrize("arch", ["llava", "qwen2.5-vl"])
def test_saved_hf_folder_pads_left_even_after_an_unpadded_call(tmp_path, arch):
    from transformers import AutoProcessor

    model, processor = build_tiny(arch, seed=0)
    processor.tokenizer("is there a red circle?")  # leaves the backend without padding
    save_hf_folder(model, processor, tmp_path)
    tok = AutoProcessor.from_pretrained(tmp_path).tokenizer
    assert tok.padding_side == "left"
    mask = tok(["is there a red circle?", "how many stars are there?"], padding=True)["attention_mask"]
    assert [row[-1] for row in mask] == [1, 1]


def test_average_of_two_checkpoints_is_their_element_wise_mean(tmp_path):
    from pruneware.models.loading import load_any
    from recipes.tiny_models.average import average_state, main

    a, processor = build_tiny("llava", seed=0)
    b, _ = build_tiny("llava", seed=1)
    save_hf_folder(a, processor, tmp_path / "a")
    save_hf_folder(b, processor, tmp_path / "b")
    main(["--out", str(tmp_path / "soup"), str(tmp_path / "a"), str(tmp_path / "b")])
    soup = load_any(str(tmp_path / "soup"), device="cpu")[0].state_dict()
    sa, sb = a.state_dict(), b.state_dict()
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(sa[key], sb[key])
    for k in sa:
        torch.testing.assert_close(soup[k], (sa[k] + sb[k]) / 2)
    with pytest.raises(ValueError, match="differ in their tensors"):
        average_state([{"x": torch.ones(2)}, {"y": torch.ones(2)}])
    with pytest.raises(ValueError, match="non-float tensor"):
        average_state([{"n": torch.tensor([1])}, {"n": torch.tensor([2])}])
    qwen, qproc = build_tiny("qwen2.5-vl", seed=0)
    save_hf_folder(qwen, qproc, tmp_path / "q")
    with pytest.raises(SystemExit, match="different config"):
        main(["--out", str(tmp_path / "bad"), str(tmp_path / "a"), str(tmp_path / "q")])


def test_lr_scale_groups_parameters_by_name_and_refuses_unknown_keys():
    """``--lr-scale``: parameters whose name contains a key form a group with that factor (the
    rest factor 1), the optimizer step applies it, and a key matching nothing names valid ones."""
    from recipes.tiny_models.assemble import lr_groups
    from recipes.tiny_models.common import optimizer_step

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    params = list(model.parameters())
    groups = lr_groups(model, params, "1.weight=5")
    assert [(g["scale"], len(g["params"])) for g in groups] == [(1.0, 3), (5.0, 1)]
    assert groups[1]["params"][0] is model[1].weight
    opt = torch.optim.AdamW(groups, lr=1.0)
    optimizer_step(opt, model(torch.ones(1, 2)).sum(), params, 0.01)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.05]
    with pytest.raises(SystemExit, match="matches no trainable parameter; e.g."):
        lr_groups(model, params, "nosuch=3")


def test_lr_scale_is_refused_outside_the_joint_phase(tmp_path, capsys):
    from recipes.tiny_models.assemble import main

    with pytest.raises(SystemExit):
        main(["--vision", str(tmp_path), "--language", str(tmp_path), "--out", str(tmp_path / "o"),
              "--phase", "project", "--lr-scale", "embed_tokens=5"])
    assert "--lr-scale applies to --phase joint only" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
