"""`sparsevlm` keeps, recycles and computes what a hand-written layer loop does from the model's own
eager attention weights and SparseVLM's official rules; the preset and the official keep lists."""

from __future__ import annotations

import pytest
import torch
from transformers.masking_utils import create_causal_mask

import pruneware
from pruneware import PlanError
from pruneware.plans.presets import get_preset
from pruneware.policies import split_budget
from pruneware.policies.sparsevlm import cluster_and_merge
from tests.reference import pad_batch, record_lm_inputs
from tests.tiny import IMAGE_TOKEN, llava_inputs, qwen_inputs, tiny_llava, tiny_qwen, tiny_qwen3_vl


def model_and_samples(family: str, attn: str = "eager"):
    """A model and three samples: text around one image, and two images in the third."""
    if family == "llava":
        model = tiny_llava(attn)
        return model, [llava_inputs(model, [(5, 1, 9)], seed=1), llava_inputs(model, [(2, 1, 6)], seed=2),
                       llava_inputs(model, [(3, 2, 5)], seed=3)]
    model = tiny_qwen(attn)
    return model, [qwen_inputs(model, [(4, [(8, 12)], 9)], seed=1), qwen_inputs(model, [(2, [(8, 8)], 6)], seed=2),
                   qwen_inputs(model, [(3, [(4, 8), (8, 8)], 5)], seed=3)]


def official_cluster_and_merge(x, cluster_num):
    """`cluster_and_merge` from SparseVLMs `llava/model/language_model/utils.py`, verbatim but for
    its density noise (`torch.rand(...) * 1e-6`), which pruneware leaves out. x: [B, N, C]."""
    B, N, C = x.shape
    x1 = x[:, :, None, :]  # ein.rearrange(x, "b l r -> b l () r")
    x2 = x[:, None, :, :]  # ein.rearrange(x, "b l r -> b () l r")
    distance = (x1 - x2).norm(dim=-1, p=2)
    dist_matrix = distance / (C ** 0.5)
    dist_nearest, index_nearest = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
    mask = density[:, None, :] > density[:, :, None]
    mask = mask.type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, index_parent = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    score = dist * density
    _, index_down = torch.topk(score, k=cluster_num, dim=-1)
    dist_matrix = dist_matrix[torch.arange(B)[:, None], index_down]  # index_points
    idx_cluster = dist_matrix.argmin(dim=1)
    idx_batch = torch.arange(B)[:, None].expand(B, cluster_num)
    idx_tmp = torch.arange(cluster_num)[None, :].expand(B, cluster_num)
    idx_cluster[idx_batch.reshape(-1), index_down.reshape(-1)] = idx_tmp.reshape(-1)
    token_weight = x.new_ones(B, N, 1)
    idx = idx_cluster + torch.arange(B)[:, None] * cluster_num
    all_weight = token_weight.new_zeros(B * cluster_num, 1)
    all_weight.index_add_(dim=0, index=idx.reshape(B * N), source=token_weight.reshape(B * N, 1))
    all_weight = all_weight + 1e-6
    norm_weight = token_weight / all_weight[idx]
    x_merged = x.new_zeros(B * cluster_num, C)
    source = x * norm_weight
    x_merged.index_add_(dim=0, index=idx.reshape(B * N), source=source.reshape(B * N, C).type(x.dtype))
    return x_merged.reshape(B, cluster_num, C), idx_cluster[0], index_down[0]


@pytest.mark.parametrize("m", [1, 2, 9, 10, 31, 154])
def test_cluster_and_merge_equals_the_official_function(m):
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 24, generator=g)
    clusters = int(m / 10) + 1
    want, _, _ = official_cluster_and_merge(x[None], clusters)
    torch.testing.assert_close(cluster_and_merge(x, clusters), want[0], atol=1e-6, rtol=1e-5)


def hand(model, sample: dict, stages: dict[int, int], compact: bool, replay: list | None = None):
    """SparseVLM by hand on one unpadded sample, in a plain layer loop with eager attention
    (the model is switched to eager for the call and switched back).

    stages: layer K -> count (the stage reads layer K-1's attention and prunes K's input).
    Returns the last-token logits and, per stage, (kept original positions, merged groups): a
    merged group is (its slot's original position, the original positions it averages). With
    `replay` (a prefill's stage records), the same tokens are kept and merged instead of chosen.
    """
    backend = model.config.text_config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        return _hand(model, sample, stages, compact, replay)
    finally:
        model.set_attn_implementation(backend)


def _hand(model, sample: dict, stages: dict[int, int], compact: bool, replay: list | None):
    seen = record_lm_inputs(model, sample)
    lm = model.model.language_model
    ids = sample["input_ids"][0]
    hidden = seen["embeds"]
    positions = seen["positions"] if seen["positions"] is not None else torch.arange(hidden.shape[1])[None]
    if positions.dim() == 3 and positions.shape[0] == 4:
        positions = positions[1:]
    origin = torch.arange(hidden.shape[1])
    visual0 = (ids == IMAGE_TOKEN).nonzero().squeeze(1)
    image0 = torch.cat([torch.tensor([0]), (visual0.diff() > 1).long().cumsum(0)])  # images are separated by text
    image_of = dict(zip(visual0.tolist(), image0.tolist(), strict=True))
    # Raters (official: m_v_t = v_t @ t_t^T, softmax over text, mean over visual, > its mean).
    text0 = torch.arange(int(visual0.max()) + 1, ids.shape[0])  # the text after the image
    m_v_t = (hidden[0, visual0] @ hidden[0, text0].T).softmax(1).mean(0)
    raters = text0[m_v_t > m_v_t.mean()].tolist()
    records, attn = [], None
    for i, layer in enumerate(lm.layers):
        if i in stages:
            visual = torch.tensor([int(o) in image_of for o in origin])
            rows = visual.nonzero().squeeze(1)
            if replay is None:
                rater_rows = torch.tensor([r for r, o in enumerate(origin.tolist()) if o in raters])
                score = attn[:, rater_rows][:, :, rows].mean(0).mean(0)  # official: heads, then raters
                images = torch.tensor([image_of[int(o)] for o in origin[rows]])
                sizes = torch.bincount(images).tolist()
                k = min(stages[i], rows.numel() - 1)
                kept = torch.cat([
                    (images == im).nonzero().squeeze(1)[score[images == im].topk(c).indices]
                    for im, c in enumerate(split_budget(sizes, k))
                ])
                pruned = torch.tensor([j for j in range(rows.numel()) if j not in kept.tolist()])
                rated = pruned[score[pruned].topk(int(pruned.numel() * 0.3) + 1).indices]
                clusters = int(rated.numel() / 10) + 1
                merged, assign, _ = official_cluster_and_merge(hidden[:, rows[rated]], clusters)
                slots = pruned[-clusters:]
                groups = [(int(origin[rows[s]]), origin[rows[rated[assign == c]]].tolist()) for c, s in enumerate(slots)]
                record = (origin[rows[kept]].tolist(), groups)
            else:
                record = replay[len(records)]
            kept_origins, groups = record
            records.append(record)
            hidden = hidden.clone()
            for slot, members in groups:
                rows_of = [int((origin == o).nonzero()) for o in members]
                hidden[0, int((origin == slot).nonzero())] = hidden[0, rows_of].sum(0) / (len(rows_of) + 1e-6)
            survivors = set(kept_origins) | {slot for slot, _ in groups}
            keep = torch.tensor([(not visual[r]) or int(o) in survivors for r, o in enumerate(origin.tolist())])
            hidden, positions, origin = hidden[:, keep], positions[..., keep], origin[keep]
            if compact:
                positions = torch.arange(hidden.shape[1])[None]
        cos_sin = lm.rotary_emb(hidden, positions)
        mask = create_causal_mask(
            config=lm.config, inputs_embeds=hidden, attention_mask=torch.ones(1, hidden.shape[1], dtype=torch.long),
            cache=None,
        )
        if i + 1 in stages:  # the layer's own eager attention weights, for the stage after it
            _, attn = layer.self_attn(
                hidden_states=layer.input_layernorm(hidden), attention_mask=mask, position_embeddings=cos_sin,
            )
            attn = attn[0]  # [H, L, L]
        hidden = layer(hidden, attention_mask=mask, position_embeddings=cos_sin, position_ids=None)
    logits = model.lm_head(lm.norm(hidden))[0, -1]
    return logits, [(sorted(k + [s for s, _ in g]), g) for k, g in records]


@pytest.mark.parametrize("family", ["llava", "qwen"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_selection_and_recycling_match_the_hand_loop_on_a_padded_batch(family, backend):
    model, samples = model_and_samples(family)
    stages, compact = {2: 5, 4: 2}, family == "llava"
    with torch.no_grad():
        expected = [hand(model, s, stages, compact) for s in samples]
    batch = pad_batch(samples)
    model.set_attn_implementation(backend)
    plan = ",".join(f"sparsevlm@{k}:{c}" + (":compact" if compact else "") for k, c in stages.items())
    with pruneware.prune(model, plan) as run, torch.no_grad():
        logits = model(**batch).logits[:, -1]
    for b, sample in enumerate(samples):
        offset = batch["input_ids"].shape[1] - sample["input_ids"].shape[1]
        for s, (kept, groups) in enumerate(expected[b][1]):
            assert (run.report.stages[s].kept[b] - offset).tolist() == kept, f"sample {b}, stage {s}"
            assert run.report.stages[s].n_after[b] == len(kept)
            assert len(groups) >= 1
        torch.testing.assert_close(logits[b], expected[b][0], atol=1e-4, rtol=1e-4)


def test_recycled_tokens_change_the_output():
    """The merged tokens are really there: without recycling the same stages keep fewer tokens
    and give other logits (so the logits check above covers the merged states)."""
    model, samples = model_and_samples("llava", "sdpa")
    out = {}
    for plan in ("sparsevlm@2:5,sparsevlm@4:2", "sparsevlm[recycle=false]@2:5,sparsevlm[recycle=false]@4:2"):
        with pruneware.prune(model, plan) as run, torch.no_grad():
            out[plan] = (model(**samples[0]).logits[0, -1], [s.n_after[0] for s in run.report.stages])
    (with_merge, counts), (without, plain) = out.values()
    assert counts == [6, 3] and plain == [5, 2]
    assert not torch.allclose(with_merge, without)


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_cached_generate_of_a_padded_batch_matches_the_hand_loop(family):
    """Every decode step equals the hand loop over prompt + generated tokens that keeps and merges
    what the prefill chose (recomputing the choice would not do: the raters include the text after
    the image, which grows)."""
    model, samples = model_and_samples(family, "sdpa")
    samples, steps, compact = samples[:2], 3, family == "llava"
    stages = {2: 5, 4: 2}
    plan = ",".join(f"sparsevlm@{k}:{c}" + (":compact" if compact else "") for k, c in stages.items())
    batch = pad_batch(samples)
    with pruneware.prune(model, plan) as run, torch.no_grad():
        out = model.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    for b, sample in enumerate(samples):
        offset = batch["input_ids"].shape[1] - sample["input_ids"].shape[1]
        with torch.no_grad():
            _, records = hand(model, sample, stages, compact)
        assert [(run.report.stages[s].kept[b] - offset).tolist() for s in range(2)] == [k for k, _ in records]
        length = sample["input_ids"].shape[1]
        for t in range(steps):
            seq = out.sequences[b : b + 1, offset : batch["input_ids"].shape[1] + t]
            inputs = {**sample, "input_ids": seq, "attention_mask": torch.ones_like(seq)}
            if "mm_token_type_ids" in sample:
                inputs["mm_token_type_ids"] = torch.nn.functional.pad(sample["mm_token_type_ids"], (0, t))
            assert seq.shape[1] == length + t
            with torch.no_grad():
                want, _ = hand(model, inputs, stages, compact, replay=[(k, g) for k, g in
                                                                         _without_slots(records)])
            torch.testing.assert_close(out.logits[t][b], want, atol=1e-4, rtol=1e-4)


def _without_slots(records):
    """Stage records as `hand` replays them: the truly kept positions (not the merged slots)."""
    out = []
    for kept, groups in records:
        slots = {s for s, _ in groups}
        out.append(([k for k in kept if k not in slots], groups))
    return out


def test_preset_follows_the_official_layers_counts_and_positions():
    plan = get_preset("sparsevlm").build(32)
    assert [s.where for s in plan.stages] == [3, 7, 16]  # official pruning_loc [2, 6, 15]: their outputs pruned
    assert plan.keep_counts(576) == [66, 30, 17] and {s.positions for s in plan.stages} == {"compact"}
    assert str(get_preset("sparsevlm").build(32, avg_tokens=82.25, n_visual=576)) == str(
        get_preset("sparsevlm-llava-64").build(32))
    qwen = get_preset("sparsevlm").build(28, rope="mrope")
    assert [s.where for s in qwen.stages] == [3, 6, 14] and {s.positions for s in qwen.stages} == {"keep"}
    with pytest.raises(PlanError, match=r"out of reach for preset 'sparsevlm' with 576 visual tokens and 8 layers"):
        get_preset("sparsevlm").build(8, avg_tokens=64, n_visual=576)


# label: (official keep list, visual tokens after each stage with the recycled ones, true average)
OFFICIAL = {
    "64": ([66, 30, 17], [82, 32, 18], 2632 / 32),
    "128": ([303, 110, 36], [312, 117, 39], 4653 / 32),
    "192": ([300, 200, 110], [309, 204, 113], 6608 / 32),
}


@pytest.fixture(scope="module")
def llava32():
    """A 32-layer tiny LLaVA with LLaVA-1.5's 24x24 grid (a 336-px image), as the official lists assume."""
    model = tiny_llava("sdpa", layers=32, image_size=336)
    return model, llava_inputs(model, [(6, 1, 12)])


@pytest.mark.parametrize("label", list(OFFICIAL))
def test_official_keep_lists_run_with_their_true_average(llava32, label):
    counts, after, average = OFFICIAL[label]
    plan = get_preset(f"sparsevlm-llava-{label}").build(32)
    assert str(plan) == ",".join(f"sparsevlm@{k}:{c}:compact" for k, c in zip((3, 7, 16), counts, strict=True))
    model, inputs = llava32
    with pruneware.prune(model, f"sparsevlm-llava-{label}") as run, torch.no_grad():
        model(**inputs)
    assert [s.n_after[0] for s in run.report.stages] == after
    assert run.report.avg_visual_tokens == pytest.approx(average)


def test_avg_tokens_counts_the_recycled_tokens(llava32):
    model, inputs = llava32
    with pruneware.prune(model, "sparsevlm", avg_tokens=64) as run, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert abs(run.report.avg_visual_tokens - 64) < 0.5
    assert [s.where for s in run.report.stages] == [3, 7, 16]


def test_qwen3_refuses_a_stage_before_its_deepstack_layers():
    model = tiny_qwen3_vl(deepstack=(0, 1, 2))
    with pytest.raises(PlanError, match=r"place it at K >= 3"):
        pruneware.prune(model, "sparsevlm@2:4")


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_a_full_budget_recycles_one_token_as_the_official_rule_does(family):
    """Keep-everything is not a no-op for SparseVLM (see docs/methods.md): the official top-k keeps
    at most n - 1 tokens, and the one left is recycled as a cluster of one, `x / (1 + 1e-6)`. The
    model then runs exactly as the unpruned one whose layer input has that one state scaled."""
    model, samples = model_and_samples(family, "sdpa")
    sample = samples[0]
    layers = model.model.language_model.layers
    seen: list[torch.Tensor] = []

    def record(_module, args, kwargs):
        seen.append(args[0].detach().clone())

    with pruneware.prune(model, "sparsevlm@2:1.0") as run:
        handle = layers[2].register_forward_pre_hook(record, with_kwargs=True)  # after the stage's own hook
        try:
            with torch.no_grad():
                pruned = model(**sample).logits
        finally:
            handle.remove()
    stage = run.report.stages[0]
    assert stage.n_after == stage.n_before
    handle = layers[2].register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**sample)
    finally:
        handle.remove()
    after_stage, unpruned = seen
    changed = (after_stage != unpruned).any(dim=-1)[0].nonzero().squeeze(1)
    assert changed.numel() == 1 and int(sample["input_ids"][0, changed]) == IMAGE_TOKEN
    scale = 1.0 / (torch.ones(1) + 1e-6)  # float32, as cluster_and_merge computes it
    assert torch.equal(after_stage[0, changed], unpruned[0, changed] * scale)

    def replay(_module, args, kwargs):
        return (after_stage, *args[1:]), kwargs

    handle = layers[2].register_forward_pre_hook(replay, with_kwargs=True)
    try:
        with torch.no_grad():
            expected = model(**sample).logits
    finally:
        handle.remove()
    assert torch.equal(pruned, expected)
