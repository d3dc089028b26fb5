"""Video on Qwen through vLLM: the offline engine with the plugin answers like the HF path, per
frame budgets included, on synthetic 4-frame videos (`drive_video.video_frames`) at 2 fps."""

from __future__ import annotations

import pytest
import torch

import pruneware
from pruneware import models
from pruneware.evals.synthetic import make_split
from pruneware.evals.synthetic.accuracy import normalize
from tests.integrations.serving.conftest import run_driver
from tests.integrations.serving.drive_video import FPS, FRAMES, video_frames, video_prompt

MODEL, N = "tiny-qwen2.5-vl", 50
PLANS = ["none", "divprune@pre:0.25", "random@pre:0.25"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(vllm_python):
    return run_driver(vllm_python, "tests.integrations.serving.drive_video", {"model": MODEL, "plans": PLANS, "n": N})


@torch.inference_mode()
def hf_video_answers(plan: str) -> tuple[list[str], list[int]]:
    model, processor = models.load(MODEL)
    meta = {"fps": FPS, "total_num_frames": FRAMES, "duration": FRAMES / FPS, "frames_indices": list(range(FRAMES))}
    answers, visual = [], []
    for item in make_split("eval", N, seed=0):
        inputs = processor(text=[video_prompt(processor, item.question)], videos=[video_frames(item)],
                           video_metadata=[meta], return_tensors="pt")
        context = pruneware.prune(model, plan, seed=0) if plan != "none" else None
        if context is None:
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        else:
            with context as run:
                out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            visual.append(len(run.report.stages[0].kept[0]))
        answers.append(normalize(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)))
    return answers, visual


@pytest.mark.parametrize("plan", PLANS)
def test_vllm_video_answers_equal_hf_answers(served, plan):
    ours, kept = hf_video_answers(plan)
    agree = sum(a == b for a, b in zip(ours, served[plan]["answers"], strict=True)) / N
    assert agree >= 0.98, f"{plan}: vLLM and HF agree on {agree:.3f} of {N} videos"
    if plan != "none":  # the same number of visual tokens kept, per video
        removed = [f - p for f, p in zip(served["none"]["prompt_lengths"], served[plan]["prompt_lengths"], strict=True)]
        assert removed == [2 * 576 - k for k in kept]
