"""Build the embedded tiny VLMs, their tokenizers and processors from configs (never the hub).

Two architectures:

* ``llava``: ``LlavaForConditionalGeneration``, a CLIP vision tower at 336 px with patch 14
  (576 image tokens, ``vision_feature_select_strategy="default"``) and a Llama LM.
* ``qwen2.5-vl``: ``Qwen2_5_VLForConditionalGeneration`` with M-RoPE; by default images are
  resized to 448 px, patch 14, 2x2 merge: 256 visual tokens per image (``vision={"patch": 7,
  "side": 336}`` gives the shipped tiny-qwen2.5-vl's 576; ``SHIPPED_VISION``).

Both tokenizers are ``tokenizers`` WordLevel models over the synthetic benchmark vocabulary.
"""

from __future__ import annotations

from typing import Literal

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from pruneware.evals.synthetic import vocabulary
from pruneware.models.tiny_configs import tiny_config

Arch = Literal["llava", "qwen2.5-vl"]
ARCHS: tuple[str, ...] = ("llava", "qwen2.5-vl")
QWEN_SIDE = 448  # qwen images are resized to 448 x 448: a 32 x 32 patch grid, 16 x 16 merged

LLAVA_SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
LLAVA_WORDS = ["USER", "ASSISTANT", ":"]
QWEN_SPECIAL = [
    "<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
QWEN_WORDS = ["user", "assistant", "system"]

LLAVA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Widths are small on purpose: the models must train from scratch in about an hour on a
# 2-core CPU. Depth is 8 LLM layers so that layer-indexed plans (e.g. K = 2, 4, 6) make sense.
LLM = {"hidden": 96, "layers": 8, "heads": 4, "kv_heads": 2, "mlp": 256, "head_dim": 24, "rope_theta": 1e6, "mrope": None}
# ``mrope``: qwen2.5-vl's M-RoPE sections [temporal, height, width] in rotary pairs (None: a 2:1:1 split of head_dim / 2).
# qwen2.5-vl's own defaults: Qwen2.5-VL gives the sections the rotary frequencies in that order, so at base 1e6 and
# head_dim 24 the width section turns by 0.0024 rad across 24 cells (the LLM cannot tell columns apart); at base
# 1000 with sections [1, 2, 9] height turns by 13 rad and width by 4.1 rad, while the text dimensions that match
# words to cells by content stay slow (tiny-qwen2.5-vl's card).
QWEN_LLM = {"rope_theta": 1000.0, "mrope": [1, 2, 9]}
VISION = {"hidden": 96, "layers": 2, "heads": 4, "mlp": 192, "patch": 14, "side": QWEN_SIDE}
# ``patch`` and ``side`` apply to qwen2.5-vl only: (side / patch / 2)^2 visual tokens per image.
# The vision towers of the two embedded models, by arch: their shipped weights load against
# ``build_config(arch, vision=SHIPPED_VISION[arch])`` (the training recipe, ``recipes/tiny_models`` in
# the repository, builds them from here). tiny-llava's tower is wider than the default; tiny-qwen2.5-vl
# has 7-px patches at 336 px: 576 visual tokens, one per cell of tiny-llava's grid.
SHIPPED_VISION: dict[str, dict] = {
    "llava": {"hidden": 128, "layers": 4, "heads": 4, "mlp": 384},
    "qwen2.5-vl": {"hidden": 96, "layers": 3, "heads": 4, "mlp": 256, "patch": 7, "side": 336},
}


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid archs: {list(ARCHS)}")


def build_tokenizer(arch: Arch) -> PreTrainedTokenizerFast:
    """WordLevel tokenizer: special tokens first, then the prompt words, then the benchmark words."""
    _check_arch(arch)
    special, extra = (LLAVA_SPECIAL, LLAVA_WORDS) if arch == "llava" else (QWEN_SPECIAL, QWEN_WORDS)
    vocab = {w: i for i, w in enumerate(special + extra + vocabulary())}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(special)
    kw = dict(model_input_names=["input_ids", "attention_mask"], unk_token="<unk>")
    if arch == "llava":
        tok = PreTrainedTokenizerFast(
            tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", bos_token="<s>", **kw
        )
    else:
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|endoftext|>", eos_token="<|im_end|>", **kw)
    tok.padding_side = "left"
    return tok


def build_processor(arch: Arch, vision: dict | None = None):
    """The real HF processor of the architecture, with the tiny tokenizer and a chat template;
    for qwen2.5-vl, ``vision`` may set ``patch`` and ``side`` (the square image side in pixels)."""
    tok = build_tokenizer(arch)
    vis = {**VISION, **(vision or {})}
    if arch == "llava":
        image = CLIPImageProcessor(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_convert_rgb=True
        )
        return LlavaProcessor(
            image_processor=image, tokenizer=tok, patch_size=14, num_additional_image_tokens=1,
            vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE,
        )  # fmt: skip
    pixels, patch = vis["side"] * vis["side"], vis["patch"]
    image = Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels, patch_size=patch, merge_size=2)
    video = Qwen2VLVideoProcessor(min_pixels=pixels // 4, max_pixels=pixels, patch_size=patch, merge_size=2)
    return Qwen2_5_VLProcessor(image_processor=image, tokenizer=tok, video_processor=video, chat_template=QWEN_TEMPLATE)


def build_config(arch: Arch, tok: PreTrainedTokenizerFast | None = None, vision: dict | None = None, **llm):
    """Model config sized by ``LLM`` (entries overridable by ``llm``) and ``VISION`` (entries
    overridable by ``vision``).

    A large ``rope_theta`` leaves more rotary frequencies slow enough that a question word can
    match image tokens by content wherever they are in the 576-token image.
    """
    _check_arch(arch)
    unknown = set(llm) - set(LLM)
    if unknown:
        raise ValueError(f"unknown LLM settings {sorted(unknown)}; valid: {sorted(LLM)}")
    spec = {**LLM, **(QWEN_LLM if arch == "qwen2.5-vl" else {}), **llm}
    bad = set(vision or {}) - set(VISION)
    if bad:
        raise ValueError(f"unknown vision settings {sorted(bad)}; valid: {sorted(VISION)}")
    vis = {**VISION, **(vision or {})}
    tok = tok or build_tokenizer(arch)
    ids = tok.convert_tokens_to_ids
    sizes = dict(
        layers=spec["layers"], hidden=spec["hidden"], heads=spec["heads"], kv_heads=spec["kv_heads"], mlp=spec["mlp"],
        vocab=len(tok), max_positions=2048, rope_theta=spec["rope_theta"],
    )
    text = dict(head_dim=spec["head_dim"], pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                tie_word_embeddings=False)
    if arch == "llava":
        if spec["mrope"] is not None:
            raise ValueError("mrope applies to qwen2.5-vl only")
        vision = dict(
            hidden_size=vis["hidden"], intermediate_size=vis["mlp"], num_hidden_layers=vis["layers"],
            num_attention_heads=vis["heads"], image_size=336,
        )  # fmt: skip
        return tiny_config(
            "llava", **sizes, text={**text, "bos_token_id": tok.bos_token_id}, vision=vision,
            ids={"image": ids("<image>")}, image_seq_length=576, vision_feature_select_strategy="default",
            vision_feature_layer=-1, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
    head_dim = spec["head_dim"]
    if head_dim * spec["heads"] != spec["hidden"]:
        raise ValueError(f"qwen2.5-vl needs head_dim * heads == hidden, got {head_dim} * {spec['heads']} != {spec['hidden']}")
    third = head_dim // 2 // 3
    mrope = spec["mrope"] or [head_dim // 2 - 2 * third, third, third]  # temporal, height, width
    if len(mrope) != 3 or sum(mrope) != head_dim // 2:
        raise ValueError(f"mrope must be 3 sections summing to head_dim / 2 = {head_dim // 2}, got {mrope}")
    vision = dict(
        depth=vis["layers"], hidden_size=vis["hidden"], intermediate_size=vis["mlp"], num_heads=vis["heads"],
        window_size=112, fullatt_block_indexes=[vis["layers"] - 1], patch_size=vis["patch"],
    )  # fmt: skip
    roles = {role: ids(f"<|{role}|>") for role in ("vision_start", "vision_end")}
    roles |= {"image": ids("<|image_pad|>"), "video": ids("<|video_pad|>")}
    return tiny_config(
        "qwen2.5-vl", **sizes, mrope=mrope, text={**text, "bos_token_id": None}, vision=vision, ids=roles,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip


def build_tiny(arch: Arch, seed: int = 0, vision: dict | None = None, **llm):
    """A randomly initialised tiny model and its processor: ``(model, processor)``.

    Deterministic in ``seed``; ``llm`` overrides entries of ``LLM``. Useful for tests that need
    a real architecture without weights.
    """
    processor = build_processor(arch, vision)
    config = build_config(arch, processor.tokenizer, vision=vision, **llm)
    torch.manual_seed(seed)
    cls = LlavaForConditionalGeneration if arch == "llava" else Qwen2_5_VLForConditionalGeneration
    model = cls(config).eval()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    return model, processor
