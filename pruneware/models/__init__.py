"""Embedded tiny VLMs trained on the synthetic benchmark: the offline default of pruneware.

    model, processor = pruneware.models.load("tiny-llava")
    text = pruneware.models.prompt("tiny-llava", "what color is the star?")
    inputs = processor(text=[text], images=[image], return_tensors="pt")

Weights, tokenizer and processor live in ``pruneware/models/weights/<name>/`` and load with
``local_files_only=True``: nothing is downloaded. Cards are in ``pruneware/models/cards/``.
"""

from __future__ import annotations

from pathlib import Path

from .build import ARCHS, build_processor, build_tiny

WEIGHTS_DIR = Path(__file__).parent / "weights"
CARDS_DIR = Path(__file__).parent / "cards"
MODELS: dict[str, str] = {"tiny-llava": "llava", "tiny-qwen2.5-vl": "qwen2.5-vl"}
_PROMPTS: dict[str, str] = {
    "llava": "USER: <image>\n{question} ASSISTANT:",
    "qwen2.5-vl": (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
}

__all__ = ["ARCHS", "MODELS", "available", "build_processor", "build_tiny", "card", "load", "path", "prompt"]


def _check(name: str) -> str:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {sorted(MODELS)}")
    return MODELS[name]


def available() -> list[str]:
    """Names of the embedded models whose weights ship with this install."""
    return sorted(n for n in MODELS if (WEIGHTS_DIR / n / "model.safetensors").is_file())


def path(name: str) -> Path:
    """Folder holding the weights, config, tokenizer and processor of ``name``."""
    _check(name)
    folder = WEIGHTS_DIR / name
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"no weights for {name!r} in {folder}; shipped models: {available()}")
    return folder


def card(name: str) -> str:
    """The model card (markdown) of ``name``."""
    _check(name)
    return (CARDS_DIR / f"{name}.md").read_text()


def prompt(name: str, question: str) -> str:
    """The one-turn prompt of ``name`` for one image and ``question``; the processor expands it."""
    return _PROMPTS[_check(name)].format(question=question)


def load(name: str, device: str = "cpu", dtype=None):
    """``(model, processor)`` of an embedded model, in eval mode, from package data only."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

    arch = _check(name)
    folder = path(name)
    cls = LlavaForConditionalGeneration if arch == "llava" else Qwen2_5_VLForConditionalGeneration
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = cls.from_pretrained(folder, **kwargs).to(device).eval()
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    return model, processor
