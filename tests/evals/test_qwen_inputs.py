"""pruneware's Qwen inputs are what Qwen's own tooling gives: `qwen_vl_utils.process_vision_info`
on the chat messages, then the processor (images, and a video given as a list of frames), and
`resize`'s budget maps to the grid `smart_resize` gives at that `max_pixels`. All offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("torchvision")  # qwen-vl-utils and Qwen's video processor import it
from qwen_vl_utils import process_vision_info  # noqa: E402
from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor  # noqa: E402

from pruneware.adapters.vision import resized_grid  # noqa: E402
from pruneware.evals.qwen_inputs import (  # noqa: E402
    is_qwen_processor, qwen_inputs, qwen_prompt, vision_inputs, vision_messages,
)
from pruneware.evals.runner import prompt_inputs  # noqa: E402
from pruneware.evals.synthetic.accuracy import build_prompt  # noqa: E402
from pruneware.models import build_processor  # noqa: E402
from pruneware.models.build import QWEN_TEMPLATE, build_tokenizer  # noqa: E402

PATCH = 7  # the embedded tiny-qwen2.5-vl's patch: smart_resize's factor is 14
# a template with a video branch, as Qwen's own chat templates have
VIDEO_TEMPLATE = QWEN_TEMPLATE.replace(
    "{% elif c['type'] == 'text' %}", "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}",
)


def picture(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def wide_processor(template: str = QWEN_TEMPLATE) -> Qwen2_5_VLProcessor:
    """A Qwen2.5-VL processor whose pixel limits leave the size to the messages (as real checkpoints' do)."""
    factor = PATCH * 2
    image = Qwen2VLImageProcessor(min_pixels=4 * factor**2, max_pixels=4096 * factor**2, patch_size=PATCH, merge_size=2)
    video = Qwen2VLVideoProcessor(min_pixels=4 * factor**2, max_pixels=4096 * factor**2, patch_size=PATCH, merge_size=2)
    return Qwen2_5_VLProcessor(image_processor=image, video_processor=video, tokenizer=build_tokenizer("qwen2.5-vl"),
                               chat_template=template)


def official(processor, conversations: list[list[dict]]) -> dict:
    """Qwen's recipe, written out: process_vision_info, then the processor (transformers 5 takes
    the videos' metadata, not an fps list), left padding."""
    images, videos, video_kwargs = process_vision_info(
        conversations, return_video_kwargs=True, return_video_metadata=True, image_patch_size=PATCH,
    )
    extra = {}
    if videos is not None:
        extra = {"videos": [v for v, _ in videos], "video_metadata": [m for _, m in videos], **video_kwargs}
    text = [processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    processor.tokenizer.padding_side = "left"
    return processor(text=text, images=images, padding=True, return_tensors="pt", **extra)


def assert_same(got, want) -> None:
    assert set(got.keys()) == set(want.keys())
    for key in want:
        assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(want[key])), key


@pytest.mark.parametrize("pixels", [{}, {"min_pixels": 64 * 196, "max_pixels": 200 * 196}])
def test_images_equal_process_vision_info_then_the_processor(pixels):
    processor = wide_processor()
    shots = [picture(336, 336, 0), picture(300, 420, 1)]
    questions = ["what color is the star ?", "how many circles ?"]
    got = qwen_inputs(processor, questions, images=shots, **pixels)
    conversations = [[{"role": "user", "content": [{"type": "image", "image": im, **pixels},
                                                   {"type": "text", "text": q}]}] for q, im in zip(questions, shots)]
    want = official(processor, conversations)
    assert_same(got, want)
    assert (got["attention_mask"] == 0).any()  # two sizes: left padding is exercised
    if pixels:  # the messages' limits decide the grid
        tokens = (got["image_grid_thw"].prod(-1) // 4).tolist()
        assert all(64 <= t <= 200 for t in tokens), tokens


def test_a_video_of_frames_equals_process_vision_info_then_the_processor():
    processor = wide_processor(VIDEO_TEMPLATE)
    frames = [picture(168, 224, s) for s in range(5)]
    got = qwen_inputs(processor, ["what moves ?"], videos=[frames], fps=2.0)
    want = official(processor, [vision_messages("what moves ?", video=frames, fps=2.0)])
    assert_same(got, want)
    t, h, w = got["video_grid_thw"][0].tolist()
    assert t == 3  # 5 frames padded to 6 by qwen-vl-utils, 2 per temporal patch
    assert int((got["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")).sum()) == t * h * w // 4
    assert got["second_per_grid_ts"].tolist() == [1.0]  # temporal patch 2 / sampled fps 2


def test_a_template_without_a_video_branch_gets_the_video_placeholder():
    """The embedded tiny-qwen2.5-vl's template writes images only: the video entry is written
    as Qwen's templates write it; the rest of the prompt is the image prompt's."""
    processor = build_processor("qwen2.5-vl")
    frames = [picture(336, 336, s) for s in range(4)]
    got = qwen_inputs(processor, ["what moves ?"], videos=[frames])
    prompt = qwen_prompt(processor, vision_messages("what moves ?", video=frames))
    assert prompt == build_prompt(processor, "what moves ?").replace("<|image_pad|>", "<|video_pad|>")
    side = 336 // processor.video_processor.patch_size
    assert got["video_grid_thw"].tolist() == [[2, side, side]]
    video_pad = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert int((got["input_ids"] == video_pad).sum()) == 2 * side * side // 4


def test_the_embedded_models_inputs_are_unchanged_at_their_own_size():
    """At the processor's own size (the synthetic benchmark's 336 px), Qwen's tooling leaves the
    image as it is: the eval's inputs equal the processor's alone, bit for bit."""
    processor = build_processor("qwen2.5-vl")
    shots = [picture(336, 336, s) for s in range(2)]
    questions = ["what color is the star ?", "is there a red circle ?"]
    got = vision_inputs(processor, questions, shots)
    processor.tokenizer.padding_side = "left"
    want = processor(text=[build_prompt(processor, q) for q in questions], images=shots, padding=True,
                     return_tensors="pt")
    assert_same(got, want)


def test_llava_keeps_its_processor_path():
    processor = build_processor("llava")
    assert not is_qwen_processor(processor) and is_qwen_processor(build_processor("qwen2.5-vl"))

    class It:
        question, image = "what color is the star ?", picture(336, 336, 3)

    got = prompt_inputs(processor, [It()], torch.device("cpu"))
    want = processor(text=[build_prompt(processor, It.question)], images=[It.image], return_tensors="pt", padding=True)
    assert_same(got, want)


@pytest.mark.parametrize("budget", [1, 3, 40, 81, 100, 150, 431, 432])
def test_resize_grid_is_smart_resize_at_the_budgets_max_pixels(budget):
    """`resize@pre` on Qwen re-encodes an (h, w)-token image at `resized_grid(h, w, budget)`:
    the grid process_vision_info + the processor give the same image at max_pixels = budget x 14^2."""
    factor = PATCH * 2
    rows, cols = resized_grid(24, 18, budget, factor)
    assert 1 <= rows * cols <= budget
    if budget < 4:  # Qwen's tooling rounds a side to 0 pixels there (PIL refuses); resize keeps 1 token
        return
    processor = wide_processor()
    image = picture(24 * factor, 18 * factor, 5)  # 24 x 18 tokens at its own size
    inputs = qwen_inputs(processor, ["q"], images=[image], min_pixels=factor**2, max_pixels=budget * factor**2)
    _, h, w = inputs["image_grid_thw"][0].tolist()
    assert (rows, cols) == (h // 2, w // 2)


def test_bad_calls_name_what_is_wrong():
    processor = wide_processor()
    with pytest.raises(ValueError, match="exactly one of images= and videos="):
        qwen_inputs(processor, ["q"])
    with pytest.raises(ValueError, match="1 questions but 2 images"):
        qwen_inputs(processor, ["q"], images=[picture(28, 28, 0)] * 2)
    with pytest.raises(ValueError, match="exactly one of image= and video="):
        vision_messages("q")
