"""Vision-side stages (`vitK`, `pre-vit`) in the vLLM plugin, on CPU with vllm importable.

The reference is pruneware's Hugging Face path on the same weights: a tiny checkpoint is written
with seeded random weights, loaded by transformers (run under `pruneware.prune`, whose vision
tower cut spreads the kept tokens over their slots, zeros elsewhere) and by the plugin's vLLM
class (vLLM's own CLIP / Qwen2.5-VL vision modules, run block by block by `vit`). The kept units
and their rows must agree (1e-5), for two images of different sizes in one call; keep-all must
equal vLLM's unpruned embedding; prompts hold the kept count, read from the pixels for `pre-vit`.
"""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # before vllm picks its platform
pytest.importorskip("vllm", reason="vllm is not importable: run .ci/install_vllm.sh to install it")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from vllm.model_executor.models.llava import LlavaForConditionalGeneration as VllmLlava  # noqa: E402
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration as VllmQwen  # noqa: E402
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402
from vllm.multimodal.utils import group_and_batch_mm_kwargs  # noqa: E402

import pruneware  # noqa: E402
from pruneware.integrations.vllm import register  # noqa: E402
from pruneware.integrations.vllm.positions import split_offsets  # noqa: E402
from pruneware.integrations.vllm.spec import PlanError, PruneSpec, parse_stages, spec_for  # noqa: E402
from pruneware.integrations.vllm.tiny import (  # noqa: E402
    _init_distributed,
    model_config,
    write_random_weights,
    write_tiny_llava,
    write_tiny_qwen,
)

LLAVA = "PrunewareLlavaForConditionalGeneration"
QWEN = "PrunewareQwen2_5_VLForConditionalGeneration"
QWEN_PLANS = ["random@vit1:0.5", "divprune@vit2:5", "pixelprune@pre-vit:1.0", "divprune@pre-vit:0.5", "random@vit0:0.4"]
LLAVA_PLANS = ["random@vit1:0.5", "divprune@vit0:9", "vision-score@vit1:0.5", "pixelprune@pre-vit:1.0",
               "divprune@pre-vit:0.25"]


def _images(sizes, flat: bool = False) -> list[Image.Image]:
    """Random images; with `flat`, a flat top half, which pixelprune drops."""
    rng = np.random.default_rng(1)
    out = []
    for height, width in sizes:
        array = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        if flat:
            array[: height // 2] = 128
        out.append(Image.fromarray(array))
    return out


@torch.no_grad()
def _load(path, arch: str, plan: str | None):
    """The vLLM class for `plan` on the CPU with the checkpoint's weights (as `tiny.cpu_model` builds it)."""
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.model_loader import get_model_architecture
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    overrides = {} if plan is None else {"architectures": [arch], "pruneware": {"plan": plan}}
    config = model_config(path, overrides)
    vllm_config = VllmConfig(model_config=config, device_config=DeviceConfig("cpu"))
    with set_current_vllm_config(vllm_config):
        _init_distributed()
        model = get_model_architecture(config)[0](vllm_config=vllm_config, prefix="")
        model.load_weights(load_file(path / "model.safetensors").items())
        process_weights_after_loading(model, config, torch.device("cpu"))
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    register()
    root = tmp_path_factory.mktemp("vllm-vit")
    qwen = write_tiny_qwen(root / "qwen")
    config = json.loads((qwen / "config.json").read_text())
    # three blocks, windows of 2x2 units (ragged on 3x4 grids), full attention at block 2
    config["vision_config"] |= {"depth": 3, "fullatt_block_indexes": [2], "window_size": 56}
    (qwen / "config.json").write_text(json.dumps(config))
    return {"llava": write_random_weights(write_tiny_llava(root / "llava")), "qwen": write_random_weights(qwen)}


def _hf(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()


def _hf_processor(path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


def _processed(path, arch: str, plan: str | None, prompt: str, images):
    config = model_config(path, {} if plan is None else {"architectures": [arch], "pruneware": {"plan": plan}})
    processor = MULTIMODAL_REGISTRY.create_processor(config)
    return processor(prompt, processor.info.parse_mm_data({"image": images}))


def _embed(model, out, method=None) -> list[torch.Tensor]:
    items = [(m, item) for m in out["mm_kwargs"] for item in out["mm_kwargs"][m]]
    rows = []
    for _, _, batch in group_and_batch_mm_kwargs(items, device="cpu"):
        rows += list((method or type(model).embed_multimodal)(model, **batch))
    return rows


def _hf_kept(hf, plan: str, features) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image, (kept rows, kept indices) of the HF session's cut tower: the spread output's nonzero rows."""
    with pruneware.prune(hf, plan, seed=0), torch.inference_mode():
        spread = features()
    out = []
    for rows in spread:
        keep = rows.abs().sum(-1).nonzero().squeeze(1)
        out.append((rows[keep], keep))
    return out


def _check(got_rows: list[torch.Tensor], want: list[tuple[torch.Tensor, torch.Tensor]], lengths: list[int]) -> None:
    for got, (rows, keep), length in zip(got_rows, want, lengths, strict=True):
        rows_got = split_offsets(got)[0]
        assert rows_got.shape[0] == length == keep.numel()
        torch.testing.assert_close(rows_got, rows, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("plan", QWEN_PLANS)
def test_qwen_vit_rows_equal_the_hf_session(tiny, plan):
    images = _images([(84, 112), (56, 84)], flat=plan.startswith("pixelprune"))
    prompt = "w1 <|vision_start|><|image_pad|><|vision_end|> w2 <|vision_start|><|image_pad|><|vision_end|>"
    out = _processed(tiny["qwen"], QWEN, plan, prompt, images)
    lengths = [p.length for p in out["mm_placeholders"]["image"]]
    model = _load(tiny["qwen"], QWEN, plan)
    got = _embed(model, out)
    hf = _hf(tiny["qwen"])
    inputs = _hf_processor(tiny["qwen"])(text=prompt, images=images, return_tensors="pt")
    pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    want = _hf_kept(hf, plan, lambda: hf.model.get_image_features(pixels, grid).pooler_output)
    for g, (_, keep), (h, w) in zip(got, want, [(3, 4), (2, 3)], strict=True):
        _, offsets, _, original = split_offsets(g)
        assert torch.equal(offsets[:, 1] * w + offsets[:, 2], keep)
        assert int(original[0]) == h * w
    _check(got, want, lengths)
    if plan.startswith("pixelprune"):
        assert lengths[0] < 12  # the flat half is dropped: the prompt holds fewer than the budget


@pytest.mark.parametrize("plan", LLAVA_PLANS)
def test_llava_vit_rows_equal_the_hf_session(tiny, plan):
    images = _images([(84, 84), (84, 84)], flat=plan.startswith("pixelprune"))
    prompt = "w1 <image> w2 <image>"
    out = _processed(tiny["llava"], LLAVA, plan, prompt, images)
    lengths = [p.length for p in out["mm_placeholders"]["image"]]
    got = _embed(_load(tiny["llava"], LLAVA, plan), out)
    hf = _hf(tiny["llava"])
    pixels = _hf_processor(tiny["llava"]).image_processor(images, return_tensors="pt")["pixel_values"]
    want = _hf_kept(hf, plan, lambda: hf.model.get_image_features(pixels, vision_feature_layer=-1,
                                                                    vision_feature_select_strategy="default").pooler_output)
    for g, (_, keep) in zip(got, want, strict=True):
        _, offsets, _, original = split_offsets(g)
        assert torch.equal(offsets[:, 0], keep) and int(original[0]) == 36
    _check(got, want, lengths)


@pytest.mark.parametrize("plan", ["random@vit1:1.0", "random@pre-vit:1.0"])
def test_keep_all_is_the_unpruned_embedding(tiny, plan):
    prompt = "w1 <|vision_start|><|image_pad|><|vision_end|> w2 <|vision_start|><|image_pad|><|vision_end|>"
    images = _images([(84, 112), (56, 84)])
    model = _load(tiny["qwen"], QWEN, plan)
    out = _processed(tiny["qwen"], QWEN, plan, prompt, images)
    for got, ref in zip(_embed(model, out), _embed(model, out, VllmQwen.embed_multimodal), strict=True):
        torch.testing.assert_close(split_offsets(got)[0], ref, rtol=0, atol=1e-6)
    llava = _load(tiny["llava"], LLAVA, plan)
    out = _processed(tiny["llava"], LLAVA, plan, "w1 <image>", _images([(84, 84)]))
    for got, ref in zip(_embed(llava, out), _embed(llava, out, VllmLlava.embed_multimodal), strict=True):
        torch.testing.assert_close(split_offsets(got)[0], ref, rtol=0, atol=1e-6)


def test_vit_positions_are_the_pre_stage_ones(tiny):
    """The scheduled positions of a vit plan equal those of a `pre` plan keeping as many tokens."""
    prompt = "w1 <|vision_start|><|image_pad|><|vision_end|> w2"
    vit = _processed(tiny["qwen"], QWEN, "random@vit1:5", prompt, _images([(84, 112)]))
    pre = _processed(tiny["qwen"], QWEN, "random@pre:5", prompt, _images([(84, 112)]))
    assert vit["prompt_token_ids"] == pre["prompt_token_ids"]


@pytest.mark.parametrize(("plan", "message"), [
    ("fastervlm@vit1:0.5", "reads the vision tower's attention"),
    ("random@vit1:0.5,random@1:0.5", "runs alone"),
    ("fastv@vit1:0.5", "cannot run in the vision tower"),
    ("random@vit1:0", "budget >= 1"),
])
def test_vit_refusals_name_what_is_served(plan, message):
    with pytest.raises(PlanError, match=message):
        parse_stages(plan, 2, "mrope")


@pytest.mark.parametrize("architecture", ["PrunewareLlavaNextForConditionalGeneration", "PrunewareQwen2VLForConditionalGeneration"])
def test_vit_stages_on_other_families_name_the_served_ones(architecture):
    from types import SimpleNamespace

    from pruneware.integrations.vllm.spec import require_spec

    config = SimpleNamespace(pruneware={"plan": "random@vit1:0.5"}, text_config=SimpleNamespace(num_hidden_layers=2))
    with pytest.raises(PlanError, match=rf"does not cut {architecture}'s vision tower.*served for PrunewareLlava.*HF wrapper"):
        require_spec(config, architecture, "1d")


def test_vit_stage_seed_is_the_sessions():
    assert spec_for("random@vit1:0.5", 3, 2, "mrope").stage_seed == 3 * 1_000_003 - 1
    assert PruneSpec(parse_stages("random@pre:0.5", 2, "mrope")[0], 3).stage_seed == 3 * 1_000_003


def test_vit_depth_is_checked(tiny):
    with pytest.raises(PlanError, match="vision tower has 3 blocks"):
        _load(tiny["qwen"], QWEN, "random@vit3:0.5")
    with pytest.raises(PlanError, match="vision tower runs 2 layers"):
        _load(tiny["llava"], LLAVA, "random@vit2:0.5")


def _video(frames: int = 4, size=(56, 84)):
    """4 frames -> 2 temporal patches of (2 x 3) units."""
    array = np.random.default_rng(2).integers(0, 255, (frames, *size, 3), dtype=np.uint8)
    meta = {"fps": 2.0, "duration": frames / 2.0, "total_num_frames": frames,
            "frames_indices": list(range(frames)), "video_backend": "opencv", "do_sample_frames": False}
    return array, meta


@pytest.mark.parametrize("plan", ["random@vit1:1.0", "divprune@vit2:2"])
def test_qwen_video_frames_keep_their_budget_each(tiny, plan):
    """In vLLM the budget applies per frame (as for every stage): 2 units of each temporal patch."""
    config = model_config(tiny["qwen"], {"architectures": [QWEN], "pruneware": {"plan": plan}})
    processor = MULTIMODAL_REGISTRY.create_processor(config)
    out = processor("w1 <|vision_start|><|video_pad|><|vision_end|>", processor.info.parse_mm_data({"video": [_video()]}))
    model = _load(tiny["qwen"], QWEN, plan)
    (got,) = _embed(model, out)
    rows, offsets, _, _ = split_offsets(got)
    (ref,) = _embed(model, out, VllmQwen.embed_multimodal)
    if plan.endswith("1.0"):
        torch.testing.assert_close(rows, ref, rtol=0, atol=1e-6)
        return
    assert rows.shape[0] == out["mm_placeholders"]["video"][0].length == 2 * 2
    within = offsets[:, 1] * 3 + offsets[:, 2]  # each frame's two kept units, in order
    assert within[:2].tolist() == sorted(within[:2].tolist()) and within[2:].tolist() == sorted(within[2:].tolist())
