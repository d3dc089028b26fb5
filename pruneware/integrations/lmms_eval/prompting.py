"""From lmms-eval's requests to processor inputs and back: messages, images, generation settings.

Images reach the processor as the PIL images (or files) the task gave, converted to RGB only:
never re-encoded, so no JPEG artefacts change what the vision tower sees.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class Prompt:
    """One sample: the chat-template messages (images as placeholders) and its images in order."""

    messages: list[dict]
    images: list[Image.Image]


def _image(value) -> Image.Image:
    if isinstance(value, Image.Image):
        return value if value.mode == "RGB" else value.convert("RGB")
    if isinstance(value, str):
        with Image.open(value) as im:
            return im.convert("RGB")
    raise TypeError(f"an image must be a PIL image or a file path, got {type(value).__name__}")


def _unsupported(kind: str) -> NotImplementedError:
    return NotImplementedError(f"--model pruneware takes images and text; this request holds {kind}, which it does not evaluate yet")


def from_messages(raw: list[dict]) -> Prompt:
    """A prompt from lmms-eval chat messages (`doc_to_messages`): `[{role, content: [...]}]`,
    content items `{"type": "text", "text"}` or `{"type": "image", "url": PIL image or path}`."""
    from lmms_eval.protocol import ChatMessages

    messages, images = [], []
    for message in ChatMessages(messages=raw).messages:
        content = []
        for part in message.content:
            if part.type == "text":
                content.append({"type": "text", "text": part.text})
            elif part.type == "image":
                content.append({"type": "image"})
                images.append(_image(part.url))
            else:
                raise _unsupported(part.type)
        messages.append({"role": message.role, "content": content})
    return Prompt(messages, images)


def from_context(context: str, visuals) -> Prompt:
    """A one-turn prompt from the simple interface: the task's text and `doc_to_visual` output.

    Images come first, as in pruneware's own evaluation prompts; `<image>` markers in the
    text are dropped, since the chat template places the images.
    """
    visuals = [v for v in (visuals or []) if v is not None]
    for v in visuals:
        if not isinstance(v, (Image.Image, str)) or (isinstance(v, str) and v.lower().endswith((".mp4", ".avi", ".mov", ".webm"))):
            raise _unsupported("video or audio" if not isinstance(v, Image.Image) else type(v).__name__)
    images = [_image(v) for v in visuals]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": context.replace("<image>", "").strip()}]
    return Prompt([{"role": "user", "content": content}], images)


def render(processor, prompt: Prompt, continuation: str | None = None) -> str:
    """The prompt text: the processor's chat template with the generation prompt."""
    if getattr(processor, "chat_template", None) is None:
        raise ValueError("the processor has no chat_template; --model pruneware builds prompts with it")
    text = processor.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False)
    return text if continuation is None else text + continuation


@dataclass(frozen=True)
class Generation:
    """lmms-eval's `generation_kwargs`, as `generate` arguments plus stop strings."""

    kwargs: dict
    until: tuple[str, ...]

    @classmethod
    def from_task(cls, gen_kwargs: dict | None, pad_token_id: int | None) -> Generation:
        gen = dict(gen_kwargs or {})
        until = gen.pop("until", None) or ()
        until = (until,) if isinstance(until, str) else tuple(until)
        temperature = float(gen.get("temperature") or 0.0)
        sample = bool(gen.get("do_sample")) or temperature > 0
        kwargs = {"max_new_tokens": int(gen.get("max_new_tokens") or 256), "do_sample": sample,
                  "pad_token_id": pad_token_id}  # fmt: skip
        if sample:
            kwargs["temperature"] = temperature or 1.0
            if gen.get("top_p") is not None:
                kwargs["top_p"] = float(gen["top_p"])
        if int(gen.get("num_beams") or 1) != 1:
            kwargs["num_beams"] = int(gen["num_beams"])
        return cls(kwargs, until)

    def cut(self, text: str) -> str:
        """The text up to the first stop string, without surrounding whitespace."""
        for stop in self.until:
            if stop:
                text = text.split(stop, 1)[0]
        return text.strip()

    @property
    def key(self) -> str:
        return repr(sorted(self.kwargs.items())) + repr(self.until)
