"""Tiny offline LLaVA and Qwen2.5-VL checkpoints for exercising the plugin on a CPU.

`write_tiny_llava(dir)` / `write_tiny_qwen(dir)` save a config, a WordLevel tokenizer and the
HF processor (nothing is downloaded, no weights are written). `cpu_model(dir, ...)` builds the
vLLM model class that vLLM itself would pick for that directory, on the CPU, with seeded random
weights: enough for `ModelConfig`, `MULTIMODAL_REGISTRY.create_processor` and `embed_multimodal`
(the full engine needs a GPU). Set VLLM_TARGET_DEVICE=cpu before vllm is first imported.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

SPECIAL = ["<pad>", "<unk>", "<image>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
VOCAB = {token: i for i, token in enumerate(SPECIAL + [f"w{i}" for i in range(40)])}
QWEN_UNIT = 28  # patch 14 x merge 2: one merged token per 28x28 pixels
QWEN_PIXELS = {"shortest_edge": QWEN_UNIT**2 * 4, "longest_edge": QWEN_UNIT**2 * 48}


def _tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    # Special tokens and words are tokens; whitespace is dropped.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s+"), behavior="removed")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
        model_input_names=["input_ids", "attention_mask"], extra_special_tokens=SPECIAL[2:],
    )


def _sizes() -> dict[str, Any]:
    """The language model's sizes, shared by both checkpoints (see `tiny_config`)."""
    return dict(layers=2, vocab=len(VOCAB), text={"pad_token_id": 0})


def write_tiny_llava(path: str | Path, image_size: int = 84) -> Path:
    """A LLaVA with a 2-layer CLIP tower of (image_size/14)^2 patches (6x6 at 84 px)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    from pruneware.models.tiny_configs import tiny_config

    path = Path(path)
    config = tiny_config(
        "llava", **_sizes(), ids={"image": VOCAB["<image>"]}, vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        vision={"image_size": image_size, "hidden_act": "gelu"},  # quick_gelu needs vllm._C on CPU
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config.save_pretrained(path)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    LlavaProcessor(
        image_processor=image_processor, tokenizer=_tokenizer(), patch_size=14,
        vision_feature_select_strategy="default", image_token="<image>", num_additional_image_tokens=1,
    ).save_pretrained(path)
    return path


def write_tiny_qwen(path: str | Path) -> Path:
    """A Qwen2.5-VL with a 1-block vision tower (patch 14, merge 2, 2 frames per temporal patch)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from pruneware.models.tiny_configs import tiny_config

    path = Path(path)
    sizes = _sizes()
    sizes["text"] |= {"bos_token_id": None, "eos_token_id": None}
    ids = {role: VOCAB[f"<|{role}|>"] for role in ("vision_start", "vision_end")}
    ids |= {"image": VOCAB["<|image_pad|>"], "video": VOCAB["<|video_pad|>"]}
    config = tiny_config("qwen2.5-vl", **sizes, ids=ids, bos_token_id=None, eos_token_id=None)
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    config.save_pretrained(path)
    kwargs = dict(size=QWEN_PIXELS, patch_size=14, merge_size=2, temporal_patch_size=2)
    Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**kwargs), video_processor=Qwen2VLVideoProcessor(**kwargs),
        tokenizer=_tokenizer(),
    ).save_pretrained(path)
    return path


# Engine-sized checkpoints for the real (CPU) vLLM engine: its CPU attention needs head sizes in
# {32, 64, 80, ...}, and vLLM's Qwen2 derives the head size as hidden / heads.
ENGINE_TEXT = dict(layers=2, hidden=128, heads=4, kv_heads=2, mlp=256, vocab=len(VOCAB))


def _qwen_ids() -> dict[str, int]:
    ids = {role: VOCAB[f"<|{role}|>"] for role in ("vision_start", "vision_end")}
    return ids | {"image": VOCAB["<|image_pad|>"], "video": VOCAB["<|video_pad|>"]}


def write_tiny_llava_next(path: str | Path, tile: int = 56) -> Path:
    """A LLaVA-NeXT with (tile/14)^2-patch tiles (4x4 at 56 px) and anyres up to 2x2 tiles."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    from pruneware.models.tiny_configs import tiny_config

    path = Path(path)
    pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]
    config = tiny_config(
        "llava-next", **ENGINE_TEXT, text={"pad_token_id": 0}, ids={"image": VOCAB["<image>"]},
        vision={"image_size": tile, "hidden_size": 64, "intermediate_size": 128, "hidden_act": "gelu"},
        vision_feature_layer=-1, vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints,
    )
    config.architectures = ["LlavaNextForConditionalGeneration"]
    config.save_pretrained(path)
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints,
    )
    LlavaNextProcessor(
        image_processor=image_processor, tokenizer=_tokenizer(), patch_size=14,
        vision_feature_select_strategy="default", image_token="<image>", num_additional_image_tokens=1,
    ).save_pretrained(path)
    return path


def write_tiny_qwen_family(path: str | Path, family: str) -> Path:
    """A Qwen2-VL or Qwen3-VL (`family`: "qwen2-vl", "qwen3-vl") with patch 14, merge 2."""
    import transformers
    from transformers import Qwen2VLImageProcessor

    from pruneware.models.tiny_configs import tiny_config

    path = Path(path)
    text = {"pad_token_id": 0, "bos_token_id": None, "eos_token_id": None}
    vision: dict[str, Any] = {"num_heads": 2}
    if family == "qwen2-vl":
        vision |= {"embed_dim": 64}
        arch, processor_cls = "Qwen2VLForConditionalGeneration", transformers.Qwen2VLProcessor
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor as video_cls
    else:
        text |= {"head_dim": 32}
        vision |= {"hidden_size": 64, "intermediate_size": 128}
        arch, processor_cls = "Qwen3VLForConditionalGeneration", transformers.Qwen3VLProcessor
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor as video_cls
    config = tiny_config(family, **ENGINE_TEXT, text=text, vision=vision, ids=_qwen_ids(),
                         bos_token_id=None, eos_token_id=None)
    config.architectures = [arch]
    config.save_pretrained(path)
    kwargs = dict(size=QWEN_PIXELS, patch_size=14, merge_size=2, temporal_patch_size=2)
    processor_cls(
        image_processor=Qwen2VLImageProcessor(**kwargs), video_processor=video_cls(**kwargs), tokenizer=_tokenizer(),
    ).save_pretrained(path)
    return path


def write_random_weights(path: str | Path, seed: int = 0, std: float = 0.1) -> Path:
    """Save seeded random weights for the checkpoint config in `path` (N(0, std) matrices and
    embeddings, transformers' init elsewhere): outputs that depend on the input, unlike vLLM's
    `load_format="dummy"` (uniform +-1e-3)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    path = Path(path)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.dim() >= 2 or name.endswith("image_newline"):
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    model.save_pretrained(path)
    # vLLM reads a CLIP tower in the hub layout
    from safetensors.torch import load_file, save_file

    from pruneware.models.serving_layout import hub_key_names

    file = path / "model.safetensors"
    save_file(hub_key_names(load_file(file)), file, metadata={"format": "pt"})
    return path


def model_config(path: str | Path, hf_overrides: dict | None = None, **kwargs: Any):
    """A vLLM ModelConfig for a tiny checkpoint (float32, short context)."""
    from vllm.config import ModelConfig

    kwargs = {"dtype": "float32", "max_model_len": 2048, "seed": 0} | kwargs
    return ModelConfig(model=str(path), tokenizer=str(path), hf_overrides=hf_overrides or {}, **kwargs)


def _init_distributed() -> None:
    from vllm.distributed import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return
    handle, name = tempfile.mkstemp(prefix="pruneware-vllm-dist-")
    os.close(handle)
    parallel_state.init_distributed_environment(
        world_size=1, rank=0, distributed_init_method=f"file://{name}", local_rank=0, backend="gloo"
    )
    parallel_state.initialize_model_parallel(1, 1)


@torch.no_grad()
def cpu_model(config, seed: int = 0) -> torch.nn.Module:
    """Build, on the CPU, the model class vLLM resolves for `config` (a ModelConfig), with
    seeded N(0, 0.05) weights; the same seed gives the same weights to every class."""
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.model_loader import get_model_architecture
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    vllm_config = VllmConfig(model_config=config, device_config=DeviceConfig("cpu"))
    with set_current_vllm_config(vllm_config):
        _init_distributed()
        cls, _ = get_model_architecture(config)
        model = cls(vllm_config=vllm_config, prefix="")
        generator = torch.Generator().manual_seed(seed)
        for _, param in sorted(model.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        process_weights_after_loading(model, config, torch.device("cpu"))
    return model.eval()
