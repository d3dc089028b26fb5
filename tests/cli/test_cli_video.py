"""`pruneware run --video`: a folder of frames goes through qwen-vl-utils as a Qwen user's would."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("torchvision")  # qwen-vl-utils and Qwen's video processor import it
from qwen_vl_utils import process_vision_info  # noqa: E402

from pruneware.cli import app  # noqa: E402
from pruneware.cli.run import video_inputs  # noqa: E402
from pruneware.evals.qwen_inputs import qwen_prompt, vision_messages  # noqa: E402
from pruneware.models import build_tiny  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frames")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (112, 140, 3), dtype=np.uint8)).save(folder / f"frame{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    model, processor = build_tiny("qwen2.5-vl", seed=0)
    folder = tmp_path_factory.mktemp("qwen")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def test_video_inputs_are_qwens_recipe(frames):
    _, processor = build_tiny("qwen2.5-vl", seed=0)
    got = video_inputs(processor, "tiny-qwen", "what moves ?", str(frames))
    pictures = [Image.open(p).convert("RGB") for p in sorted(frames.iterdir())]
    messages = vision_messages("what moves ?", video=pictures)
    _, videos, kwargs = process_vision_info([messages], return_video_kwargs=True, return_video_metadata=True,
                                            image_patch_size=processor.video_processor.patch_size)
    want = processor(text=[qwen_prompt(processor, messages)], videos=[videos[0][0]], video_metadata=[videos[0][1]],
                     padding=True, return_tensors="pt", **kwargs)
    assert set(got.keys()) == set(want.keys()) >= {"pixel_values_videos", "video_grid_thw", "second_per_grid_ts"}
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_run_answers_about_a_video(qwen_dir, frames):
    result = runner.invoke(app, ["run", "--model", qwen_dir, "--video", str(frames), "--prompt", "what moves ?",
                                 "--plan", "divprune@pre:0.5", "--max-new-tokens", "2", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    n = payload["unpruned"]["visual_tokens"]
    assert n > 0 and n % 2 == 0  # two frames per temporal patch: one video unit of t = 2
    assert payload["pruned"]["kept_per_stage"] == [n // 2]


def test_video_is_refused_where_it_cannot_run(frames, tmp_path):
    result = runner.invoke(app, ["run", "--model", "tiny-llava", "--video", str(frames), "--prompt", "q"])
    assert result.exit_code == 2 and "--video needs a Qwen model" in result.output
    result = runner.invoke(app, ["run", "--image", "x.png", "--video", str(frames), "--prompt", "q"])
    assert result.exit_code == 2 and "not both" in result.output
    result = runner.invoke(app, ["run", "--model", "tiny-qwen2.5-vl", "--video", str(tmp_path / "none"), "--prompt", "q"])
    assert result.exit_code == 2 and "video not found" in result.output
