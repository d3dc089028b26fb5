"""Tiny random-weight LLaVA and Qwen2.5-VL models and hand-built inputs for tests.

Nothing here touches the network: models are built from configs and inputs are
assembled token by token, so the tests control exactly where visual tokens sit.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)

VOCAB = 96
IMAGE_TOKEN = 90
VIDEO_TOKEN = 91
PAD = 0


def tiny_llava(attn: str = "sdpa", layers: int = 6, image_size: int = 56, seed: int = 0):
    """A LLaVA with a CLIP tower of `(image_size/14)**2` patches and a Llama LM."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=14, projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=PAD,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = PAD
    return model


def llava_inputs(model, texts: list[tuple[int, int, int]], seed: int = 0) -> dict:
    """Left-padded LLaVA inputs. Each sample is (n_before, n_images, n_after) text tokens around images."""
    g = torch.Generator().manual_seed(seed)
    vc = model.config.vision_config
    n_img = (vc.image_size // vc.patch_size) ** 2
    rows, n_images = [], 0
    for before, images, after in texts:
        ids = torch.randint(2, 80, (before,), generator=g).tolist()
        for _ in range(images):
            ids += [IMAGE_TOKEN] * n_img + torch.randint(2, 80, (2,), generator=g).tolist()
        ids += torch.randint(2, 80, (after,), generator=g).tolist()
        rows.append(ids)
        n_images += images
    length = max(map(len, rows))
    input_ids = torch.full((len(rows), length), PAD)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, ids in enumerate(rows):
        input_ids[b, length - len(ids):] = torch.tensor(ids)
        mask[b, length - len(ids):] = 1
    out = {"input_ids": input_ids, "attention_mask": mask}
    if n_images:
        out["pixel_values"] = torch.randn(n_images, 3, vc.image_size, vc.image_size, generator=g)
    return out


def tiny_qwen(attn: str = "sdpa", layers: int = 6, seed: int = 0):
    """A Qwen2.5-VL with a 1-block vision tower (patch 14, merge 2) and an M-RoPE LM."""
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            pad_token_id=PAD,
        ),
        vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
            fullatt_block_indexes=[0],
        ),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, bos_token_id=None, eos_token_id=None,
        vision_start_token_id=92, vision_end_token_id=93,
    )
    config._attn_implementation = attn
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = PAD
    return model


def qwen_inputs(model, texts: list[tuple[int, list[tuple[int, int]], int]], seed: int = 0) -> dict:
    """Left-padded Qwen inputs. Each sample is (n_before, [(grid_h, grid_w) per image], n_after).

    Grids are in patches (before the 2x2 merge), so an image of (8, 12) gives 24 visual tokens.
    """
    g = torch.Generator().manual_seed(seed)
    vc = model.config.vision_config
    patch_dim = 3 * vc.temporal_patch_size * vc.patch_size**2
    rows, types, grids, pixels = [], [], [], []
    for before, images, after in texts:
        ids = torch.randint(2, 80, (before,), generator=g).tolist()
        for h, w in images:
            n_tok = h * w // vc.spatial_merge_size**2
            ids += [92] + [IMAGE_TOKEN] * n_tok + [93]
            grids.append([1, h, w])
            pixels.append(torch.randn(h * w, patch_dim, generator=g))
        ids += torch.randint(2, 80, (after,), generator=g).tolist()
        rows.append(ids)
    length = max(map(len, rows))
    input_ids = torch.full((len(rows), length), PAD)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, ids in enumerate(rows):
        input_ids[b, length - len(ids):] = torch.tensor(ids)
        mask[b, length - len(ids):] = 1
    out = {
        "input_ids": input_ids, "attention_mask": mask,
        "mm_token_type_ids": (input_ids == IMAGE_TOKEN).int(),
    }
    if grids:
        out["pixel_values"] = torch.cat(pixels)
        out["image_grid_thw"] = torch.tensor(grids)
    return out
