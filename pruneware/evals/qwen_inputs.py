"""Model inputs built the way Qwen's own tooling builds them: `qwen-vl-utils`.

Qwen-VL users turn chat messages into pixels with `qwen_vl_utils.process_vision_info` (it
reads images and videos, sizes each with its `smart_resize` between `min_pixels` and
`max_pixels`, and samples video frames), then hand the result to the processor. pruneware's
CLI and evals do the same for every Qwen processor (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), so a
question runs on exactly the inputs a Qwen user would give the model; other processors
(LLaVA) get `processor(text=..., images=...)` as before.

By default the message entries carry no `min_pixels` / `max_pixels`, as in Qwen's model cards:
`process_vision_info` then only rounds each side to whole merge units (within its own wide
limits) and the processor's `smart_resize` sets the final size, so the grid is the one the
processor alone gives. A caller may set them (and `fps` / `nframes` for videos) per call, as in
Qwen's `{"type": "image", "image": ..., "max_pixels": ...}` entries. Note that `smart_resize`
run twice is not always idempotent: with a processor whose `min_pixels` equals its
`max_pixels` (the embedded tiny-qwen2.5-vl's), limits given here can end one merge unit off
the processor's own choice, exactly as they would for a Qwen user.
A video is a list of frames (PIL images) or a file path that qwen-vl-utils can decode
(torchvision, or decord / torchcodec when installed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

Video = Sequence[Image.Image] | str


def is_qwen_processor(processor: Any) -> bool:
    """True for a Qwen-VL processor: its image processor groups patches in merge units and it
    has a video processor (`Qwen2VLImageProcessor` and its fast and Qwen3 variants)."""
    image = getattr(processor, "image_processor", None)
    return all(getattr(image, a, None) is not None for a in ("merge_size", "patch_size", "temporal_patch_size")) and (
        getattr(processor, "video_processor", None) is not None
    )


def vision_messages(
    question: str, image: Image.Image | None = None, video: Video | None = None, **pixels: int
) -> list[dict[str, Any]]:
    """One user turn in Qwen's message format: the image or video entry (with any of
    `min_pixels`, `max_pixels`, `fps`, `nframes`), then the question."""
    if (image is None) == (video is None):
        raise ValueError("give exactly one of image= and video=")
    entry: dict[str, Any] = {"type": "image", "image": image} if image is not None else {"type": "video", "video": video}
    if isinstance(video, (list, tuple)):
        entry["video"] = list(video)
    entry.update(pixels)
    return [{"role": "user", "content": [entry, {"type": "text", "text": question}]}]


def qwen_prompt(processor: Any, messages: list[dict[str, Any]]) -> str:
    """The generation prompt of `messages` from the processor's chat template. A template
    without a video branch (the embedded tiny-qwen2.5-vl's) is given the image entry and its
    image placeholder becomes the video one, as Qwen's own templates write it."""
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    kinds = [c["type"] for m in messages for c in m["content"] if isinstance(c, dict)]
    if "video" in kinds and processor.video_token not in text:
        as_image = [{**m, "content": [{**c, "type": "image"} if c.get("type") == "video" else c for c in m["content"]]}
                    for m in messages]
        text = processor.apply_chat_template(as_image, add_generation_prompt=True, tokenize=False)
        text = text.replace(processor.image_token, processor.video_token)
    return text


def qwen_inputs(
    processor: Any, questions: Sequence[str], images: Sequence[Image.Image] | None = None,
    videos: Sequence[Video] | None = None, image_patch_size: int | None = None, **pixels: int,
) -> Any:
    """A left-padded batch (`BatchFeature`, tensors on the CPU) for one image or one video per
    question, built as Qwen's tooling builds it: `process_vision_info` on the messages (with
    `return_video_metadata=True`, the form transformers 5 takes), then the processor with the
    frames, their metadata (the sampled fps, hence `second_per_grid_ts`) and `do_sample_frames=False`.

    pixels: entries of every message's image or video: `min_pixels`, `max_pixels` (default: none,
    qwen-vl-utils' own), for videos `fps` or `nframes`, `total_pixels`. image_patch_size: the
    ViT patch (default: the processor's; 14 on Qwen2/2.5-VL, 16 on Qwen3-VL).
    """
    from qwen_vl_utils import process_vision_info

    if (images is None) == (videos is None):
        raise ValueError("give exactly one of images= and videos=")
    media = list(images if images is not None else videos)  # type: ignore[arg-type]
    if len(media) != len(questions):
        raise ValueError(f"{len(questions)} questions but {len(media)} {'images' if images is not None else 'videos'}")
    sub = processor.image_processor if images is not None else processor.video_processor
    conversations = [
        vision_messages(q, image=m, **pixels) if images is not None else vision_messages(q, video=m, **pixels)
        for q, m in zip(questions, media, strict=True)
    ]
    patch = image_patch_size or int(sub.patch_size)
    image_inputs, video_inputs, video_kwargs = process_vision_info(
        conversations, return_video_kwargs=True, return_video_metadata=True, image_patch_size=patch
    )
    video_part: dict[str, Any] = {}
    if video_inputs:  # (frames [T, C, H, W], metadata) per video: the processor reads the sampled fps from it
        frames, metadata = zip(*video_inputs, strict=True)
        video_part = {"videos": list(frames), "video_metadata": list(metadata), **video_kwargs}
    tok = processor.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    try:
        return processor(
            text=[qwen_prompt(processor, c) for c in conversations], images=image_inputs, padding=True,
            return_tensors="pt", **video_part,
        )
    finally:
        tok.padding_side = side


def qwen_images(processor: Any, images_per_prompt: Sequence[Sequence[Image.Image]]) -> list[Any]:
    """The images of several prompts, in order, as Qwen's tooling hands them to the processor:
    `process_vision_info` on one user turn per prompt holding that prompt's images (no
    `min_pixels` / `max_pixels`, as in `qwen_inputs`). For callers whose prompt text is already
    rendered (lmms-eval's messages), so only the pixels take Qwen's route."""
    from qwen_vl_utils import process_vision_info

    conversations = [[{"role": "user", "content": [{"type": "image", "image": im} for im in images]}]
                     for images in images_per_prompt if images]  # fmt: skip
    if not conversations:
        return []
    image_inputs, _ = process_vision_info(conversations, image_patch_size=int(processor.image_processor.patch_size))
    return list(image_inputs or [])


def vision_inputs(processor: Any, questions: Sequence[str], images: Sequence[Image.Image], prompt=None) -> Any:
    """A left-padded batch for one image per question: Qwen's tooling for Qwen processors
    (`qwen_inputs`), else `processor(text=prompt(processor, q), images=...)`."""
    if is_qwen_processor(processor):
        return qwen_inputs(processor, questions, images=images)
    from pruneware.evals.synthetic.accuracy import build_prompt

    prompt = prompt or build_prompt
    tok = processor.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    try:
        return processor(text=[prompt(processor, q) for q in questions], images=list(images), return_tensors="pt",
                         padding=True)
    finally:
        tok.padding_side = side
