"""The pruned vLLM models on CPU: placeholder counts (prompts and profiling), embed_multimodal
rows against the unpruned embedding, and positions: the kept tokens' final positions (scheduled
positions plus the offsets `embed_multimodal` carries) against vLLM's own unpruned positions.

Expected kept indices are derived independently of the plugin's plumbing: from the unpruned
embedding of vLLM's own base class (called on the same weights), frame by frame.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # before vllm picks its platform
pytest.importorskip("vllm", reason="vllm is not importable: run .ci/install_vllm.sh to install it")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from vllm.model_executor.models.llava import LlavaForConditionalGeneration as VllmLlava  # noqa: E402
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration as VllmQwen  # noqa: E402
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402
from vllm.multimodal.encoder_budget import get_mm_max_toks_per_item  # noqa: E402
from vllm.multimodal.inputs import MultiModalFeatureSpec  # noqa: E402
from vllm.multimodal.utils import group_and_batch_mm_kwargs  # noqa: E402

from pruneware.integrations.vllm import register  # noqa: E402
from pruneware.integrations.vllm.positions import split_offsets  # noqa: E402
from pruneware.integrations.vllm.spec import PruneSpec, parse_stages  # noqa: E402
from pruneware.integrations.vllm.tiny import cpu_model, model_config, write_tiny_llava, write_tiny_qwen  # noqa: E402
from pruneware.policies.divprune import max_min_diverse  # noqa: E402

LLAVA = "PrunewareLlavaForConditionalGeneration"
QWEN = "PrunewareQwen2_5_VLForConditionalGeneration"
QWEN_PROMPT = (
    "w1 <|vision_start|><|image_pad|><|vision_end|> w2 w3 <|vision_start|><|video_pad|><|vision_end|> w4"
)
SEED_STRIDE = 1_000_003  # the session's stage-0 seed is seed * 1_000_003


def _config(path, arch: str, plan: str, **kwargs):
    return model_config(path, {"architectures": [arch], "pruneware": {"plan": plan}}, **kwargs)


def _images(n: int, size=(84, 112)) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)) for _ in range(n)]


def _video(frames: int = 4, size=(56, 84)):
    """4 frames -> 2 temporal patches of (2 x 3) merged tokens."""
    array = np.random.default_rng(2).integers(0, 255, (frames, *size, 3), dtype=np.uint8)
    meta = {"fps": 2.0, "duration": frames / 2.0, "total_num_frames": frames,
            "frames_indices": list(range(frames)), "video_backend": "opencv", "do_sample_frames": False}
    return array, meta


def _lengths(out, modality: str) -> list[int]:
    return [p.length for p in out["mm_placeholders"][modality]]


def _embed(model, out, method=None, raw: bool = False) -> list[torch.Tensor]:
    """Run embed_multimodal the way the model runner does: batched per modality. The plugin's
    rows lose their position-offset channels unless `raw`."""
    items = [(m, item) for m in out["mm_kwargs"] for item in out["mm_kwargs"][m]]
    rows = []
    for _, _, batch in group_and_batch_mm_kwargs(items, device="cpu"):
        rows += list((method or type(model).embed_multimodal)(model, **batch))
    return rows if method is not None or raw else [split_offsets(r)[0] for r in rows]


def _random_keep(n_frames: int, per_frame: int, k: int, seed: int = 0) -> torch.Tensor:
    """`random`'s draw for one item: one generator over all its tokens, top-k per frame."""
    scores = torch.rand(n_frames * per_frame, generator=torch.Generator().manual_seed(seed * SEED_STRIDE))
    parts = [f * per_frame + scores[f * per_frame:(f + 1) * per_frame].topk(k).indices for f in range(n_frames)]
    return torch.cat(parts).sort().values


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    register()
    root = tmp_path_factory.mktemp("vllm-tiny-models")
    return {"llava": write_tiny_llava(root / "llava"), "qwen": write_tiny_qwen(root / "qwen")}


@pytest.fixture(scope="module")
def llava(tiny):
    return cpu_model(_config(tiny["llava"], LLAVA, "divprune@pre:9"))


@pytest.fixture(scope="module")
def qwen(tiny):
    return cpu_model(_config(tiny["qwen"], QWEN, "divprune@pre:0.5"))


@pytest.fixture
def plan(request):
    """Swap a model's plan for one test (the spec is plain data read at every call)."""
    def use(model, text: str, rope: str) -> PruneSpec:
        saved = model.pruneware
        request.addfinalizer(lambda: setattr(model, "pruneware", saved))
        model.pruneware = PruneSpec(parse_stages(text, 2, rope)[0])
        return model.pruneware
    return use


@pytest.mark.parametrize(("text", "count"), [
    ("divprune@pre:0.25", 9), ("random@pre:5", 5), ("crosslmm@pre:9", 9), ("crosslmm@pre:7", 6),
    ("crosslmm[factor=4]@pre:1.0", 4),
])
def test_llava_placeholders_for_prompts_and_profiling(tiny, text, count):
    processor = MULTIMODAL_REGISTRY.create_processor(_config(tiny["llava"], LLAVA, text))
    out = processor("w1 <image> w2 <image> w3", processor.info.parse_mm_data({"image": _images(2)}))
    assert _lengths(out, "image") == [count, count]
    assert len(out["prompt_token_ids"]) == 3 + 2 * count
    assert get_mm_max_toks_per_item(processor, {"image": 1}, None) == {"image": count}
    assert _lengths(processor.get_dummy_mm_inputs({"image": 2}), "image") == [count, count]


@pytest.mark.parametrize(("text", "image", "video"), [
    ("divprune@pre:0.5", 6, 2 * 3), ("random@pre:4", 4, 2 * 4), ("crosslmm[factor=2]@pre:1.0", 4, 2 * 2),
])
def test_qwen_placeholders_per_image_and_per_frame(tiny, text, image, video):
    processor = MULTIMODAL_REGISTRY.create_processor(_config(tiny["qwen"], QWEN, text))
    data = processor.info.parse_mm_data({"image": _images(1), "video": [_video()]})
    out = processor(QWEN_PROMPT, data)
    assert (_lengths(out, "image"), _lengths(out, "video")) == ([image], [video])


def test_qwen_profiling_uses_pruned_counts(tiny):
    spec = PruneSpec(parse_stages("divprune@pre:0.25", 2, "mrope")[0])
    pruned = MULTIMODAL_REGISTRY.create_processor(_config(tiny["qwen"], QWEN, str(spec.stage)))
    full = MULTIMODAL_REGISTRY.create_processor(model_config(tiny["qwen"]))
    counts = {"image": 1, "video": 1}
    dummy = pruned.get_dummy_mm_inputs(counts)
    expected = {}
    for modality in counts:
        frames, height, width = dummy["mm_kwargs"][modality][0][f"{modality}_grid_thw"].data.tolist()
        expected[modality] = frames * spec.frame(height // 2, width // 2).count
        assert _lengths(dummy, modality) == [expected[modality]]
    assert get_mm_max_toks_per_item(pruned, counts, None) == expected
    full_max = get_mm_max_toks_per_item(full, counts, None)
    assert expected["image"] == round(full_max["image"] * 0.25)
    assert all(expected[m] < full_max[m] for m in counts)


@pytest.mark.parametrize("text", ["divprune@pre:9", "random@pre:7", "vision-score@pre:0.5", "random@pre:1.0"])
def test_llava_embed_returns_the_kept_rows_in_order(tiny, llava, plan, text):
    spec = plan(llava, text, "1d")
    processor = MULTIMODAL_REGISTRY.create_processor(_config(tiny["llava"], LLAVA, text))
    out = processor("w1 <image> w2 <image>", processor.info.parse_mm_data({"image": _images(2)}))
    base = VllmLlava
    rows = _embed(llava, out)
    full = _embed(llava, out, base.embed_multimodal)  # [36, D] per image, unpruned
    k = spec.frame(6, 6).count
    for i, (got, ref) in enumerate(zip(rows, full, strict=True)):
        if spec.stage.policy == "divprune":
            keep = max_min_diverse(ref[None], k)[0]
        elif spec.stage.policy == "random":
            keep = _random_keep(1, 36, k)
        else:  # vision-score: the CLIP features before the projector, scored by their mean
            pixels = out["mm_kwargs"]["image"][i]["pixel_values"].data[None]
            vision = llava.vision_tower(pixels, feature_select_strategy="default")[0]
            keep = (vision @ vision.mean(0)).topk(k).indices.sort().values
        assert got.shape[0] == _lengths(out, "image")[i] == k
        torch.testing.assert_close(got, ref[keep], rtol=0, atol=0)


@pytest.mark.parametrize(("budget", "grid"), [(9, (3, 3)), (7, (3, 2))])
def test_llava_crosslmm_returns_pooled_rows(tiny, llava, plan, budget, grid):
    text = f"crosslmm[gate=0.0]@pre:{budget}"
    spec = plan(llava, text, "1d")
    assert (spec.frame(6, 6).rows, spec.frame(6, 6).cols) == grid
    processor = MULTIMODAL_REGISTRY.create_processor(_config(tiny["llava"], LLAVA, text))
    out = processor("<image> w1", processor.info.parse_mm_data({"image": _images(1)}))
    rows = _embed(llava, out)[0]
    full = _embed(llava, out, VllmLlava.embed_multimodal)[0]
    pooled = torch.nn.functional.adaptive_avg_pool2d(full.T.reshape(1, -1, 6, 6), grid)  # [1, D, *grid]
    torch.testing.assert_close(rows, pooled.reshape(full.shape[1], -1).T)


@pytest.mark.parametrize("text", ["divprune@pre:0.5", "random@pre:2", "random@pre:1.0"])
def test_qwen_embed_prunes_images_and_each_frame(tiny, qwen, plan, text):
    spec = plan(qwen, text, "mrope")
    processor = MULTIMODAL_REGISTRY.create_processor(_config(tiny["qwen"], QWEN, text))
    out = processor(QWEN_PROMPT, processor.info.parse_mm_data({"image": _images(1), "video": [_video()]}))
    rows = _embed(qwen, out)
    full = _embed(qwen, out, VllmQwen.embed_multimodal)
    for got, ref, (frames, rows_, cols), length in zip(
        rows, full, [(1, 3, 4), (2, 2, 3)], _lengths(out, "image") + _lengths(out, "video"), strict=True
    ):
        n, k = rows_ * cols, spec.frame(rows_, cols).count
        if spec.stage.policy == "divprune":
            per_frame = max_min_diverse(ref.reshape(frames, n, -1), k)
            keep = (per_frame + torch.arange(frames)[:, None] * n).reshape(-1)
        else:
            keep = _random_keep(frames, n, k)
        assert got.shape[0] == length == frames * k
        torch.testing.assert_close(got, ref[keep], rtol=0, atol=0)
    if text == "random@pre:1.0":  # keep-all is the unpruned embedding
        for got, ref in zip(rows, full, strict=True):
            torch.testing.assert_close(got, ref, rtol=0, atol=0)


def _features(out) -> list[MultiModalFeatureSpec]:
    return [
        MultiModalFeatureSpec(data=item, modality=m, identifier=f"{m}{i}", mm_position=out["mm_placeholders"][m][i])
        for m in out["mm_kwargs"] for i, item in enumerate(out["mm_kwargs"][m])
    ]


def _final_positions(model, out) -> tuple[torch.Tensor, int]:
    """[3, L] positions the first layer sees for a processed prompt, and the decode delta: the
    scheduled positions plus the offsets embed_multimodal carries, through the model's own
    embed_input_ids / forward hand-over."""
    ids = out["prompt_token_ids"]
    positions, delta = model.get_mrope_input_positions(ids, _features(out))
    placeholders = [p for m in out["mm_kwargs"] for p in out["mm_placeholders"][m]]
    rows = [r for _, r in sorted(zip([p.offset for p in placeholders], _embed(model, out, raw=True)), key=lambda x: x[0])]
    mask = torch.zeros(len(ids), dtype=torch.bool)
    for p in placeholders:
        mask[p.offset : p.offset + p.length] = True
    model.embed_input_ids(torch.tensor(ids), rows, is_multimodal=mask)
    offsets, model._pending_offsets = model._pending_offsets, None
    return positions + offsets.T, delta


def _expected_positions(full_out, full_positions, pruned_out, keeps) -> torch.Tensor:
    """The unpruned prompt's positions at the pruned prompt's tokens: text maps to text, an item's
    slots to its kept original tokens (`keeps`, one index tensor per item in prompt order)."""
    def spans(out):
        return sorted((p.offset, p.length) for m in out["mm_kwargs"] for p in out["mm_placeholders"][m])

    index, cursor_full = [], 0
    for _, (full_offset, full_length), keep in zip(spans(pruned_out), spans(full_out), keeps, strict=True):
        index += range(cursor_full, full_offset)
        index += (full_offset + keep).tolist()
        cursor_full = full_offset + full_length
    index += range(cursor_full, len(full_out["prompt_token_ids"]))
    assert len(index) == len(pruned_out["prompt_token_ids"])
    return full_positions[:, index]


@pytest.mark.parametrize("text", ["random@pre:2", "random@pre:1.0"])
def test_qwen_kept_tokens_keep_their_original_positions(tiny, qwen, plan, text):
    spec = plan(qwen, text, "mrope")
    data = {"image": _images(1), "video": [_video()]}
    pruned = MULTIMODAL_REGISTRY.create_processor(_config(tiny["qwen"], QWEN, text))
    full = MULTIMODAL_REGISTRY.create_processor(model_config(tiny["qwen"]))
    out, full_out = pruned(QWEN_PROMPT, pruned.info.parse_mm_data(data)), full(QWEN_PROMPT, full.info.parse_mm_data(data))
    want, want_delta = VllmQwen.get_mrope_input_positions(qwen, full_out["prompt_token_ids"], _features(full_out))
    keeps = [_random_keep(frames, r * c, spec.frame(r, c).count) for frames, r, c in [(1, 3, 4), (2, 2, 3)]]
    got, delta = _final_positions(qwen, out)
    assert torch.equal(got, _expected_positions(full_out, want, out, keeps))
    # Decoding continues where it would after the unpruned prompt.
    assert delta == want_delta + len(full_out["prompt_token_ids"]) - len(out["prompt_token_ids"])


def test_qwen_pooled_tokens_sit_on_their_pooled_grid(tiny, qwen, plan):
    # As the HF adapter lays merged tokens out (Adapter.merged_positions): frame f of a pooled
    # rows x cols grid at (t(f), row, col) from the item's start; the next text starts
    # max(rows, cols) further on.
    spec = plan(qwen, "crosslmm@pre:0.5", "mrope")
    processor = MULTIMODAL_REGISTRY.create_processor(_config(tiny["qwen"], QWEN, "crosslmm@pre:0.5"))
    out = processor(QWEN_PROMPT, processor.info.parse_mm_data({"image": _images(1), "video": [_video()]}))
    ids = out["prompt_token_ids"]
    positions, delta = _final_positions(qwen, out)
    tps = int(qwen.config.vision_config.tokens_per_second)
    image, video = spec.frame(3, 4), spec.frame(2, 3)
    text = lambda start, n: [[start + i] * 3 for i in range(n)]  # noqa: E731
    expected = text(0, 2)  # w1 <vision_start>
    expected += [[2, 2 + r, 2 + c] for r in range(image.rows) for c in range(image.cols)]
    start = 2 + max(image.rows, image.cols)
    expected += text(start, 4)  # <vision_end> w2 w3 <vision_start>
    start += 4
    expected += [[start + f * tps, start + r, start + c] for f in range(2) for r in range(video.rows) for c in range(video.cols)]
    after = start + max(video.rows, video.cols)
    expected += text(after, 2)  # <vision_end> w4
    assert positions.T.tolist() == expected
    assert delta == after + 2 - len(ids)


@pytest.mark.parametrize("text", ["random@pre:7", "crosslmm@pre:9", "random@pre:7:compact"])
def test_llava_kept_tokens_keep_their_original_positions(tiny, llava, plan, text):
    spec = plan(llava, text, "1d")
    data = {"image": _images(2)}
    prompt = "w1 <image> w2 <image> w3"
    pruned = MULTIMODAL_REGISTRY.create_processor(_config(tiny["llava"], LLAVA, text))
    full = MULTIMODAL_REGISTRY.create_processor(model_config(tiny["llava"]))
    out, full_out = pruned(prompt, pruned.info.parse_mm_data(data)), full(prompt, full.info.parse_mm_data(data))
    got, delta = _final_positions(llava, out)
    length = len(out["prompt_token_ids"])
    if spec.stage.positions == "compact":
        assert torch.equal(got, torch.arange(length).expand(3, -1)) and delta == 0
        return
    if spec.policy.needs.merges:  # each pooled token stands at the original token its window starts at
        from pruneware.integrations.vllm.prune import prune_item

        keep = prune_item(spec, torch.randn(36, 8), (1, 6, 6))[1]
        keeps = [keep, keep]
    else:
        keeps = [_random_keep(1, 36, 7)] * 2
    full_positions = torch.arange(len(full_out["prompt_token_ids"])).expand(3, -1)
    assert torch.equal(got, _expected_positions(full_out, full_positions, out, keeps))
    assert delta == len(full_out["prompt_token_ids"]) - length


def test_qwen_encoder_cuda_graphs_are_off(qwen):
    assert qwen.get_encoder_cudagraph_config().modalities == []


def test_llava_image_embeddings_input_is_pruned_too(tiny, llava, plan):
    spec = plan(llava, "divprune@pre:9", "1d")
    config = _config(tiny["llava"], LLAVA, "divprune@pre:9", enable_mm_embeds=True)
    processor = MULTIMODAL_REGISTRY.create_processor(config)
    embeds = torch.randn(1, 36, 64, generator=torch.Generator().manual_seed(5))
    out = processor("w1 <image> w2", processor.info.parse_mm_data({"image": embeds}))
    assert _lengths(out, "image") == [spec.frame(6, 6).count] == [9]
    rows = _embed(llava, out)[0]
    torch.testing.assert_close(rows, embeds[0][max_min_diverse(embeds, 9)[0]], rtol=0, atol=0)
