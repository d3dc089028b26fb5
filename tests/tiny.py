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


def left_pad(rows: list[list[int]]) -> dict:
    """Token rows of different lengths -> left-padded input_ids and attention_mask [B, L]."""
    length = max(map(len, rows))
    input_ids = torch.full((len(rows), length), PAD)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, ids in enumerate(rows):
        input_ids[b, length - len(ids):] = torch.tensor(ids)
        mask[b, length - len(ids):] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


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
    out = left_pad(rows)
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
    rows, grids, pixels = [], [], []
    for before, images, after in texts:
        ids = torch.randint(2, 80, (before,), generator=g).tolist()
        for h, w in images:
            n_tok = h * w // vc.spatial_merge_size**2
            ids += [92] + [IMAGE_TOKEN] * n_tok + [93]
            grids.append([1, h, w])
            pixels.append(torch.randn(h * w, patch_dim, generator=g))
        ids += torch.randint(2, 80, (after,), generator=g).tolist()
        rows.append(ids)
    out = left_pad(rows)
    out["mm_token_type_ids"] = (out["input_ids"] == IMAGE_TOKEN).int()
    if grids:
        out["pixel_values"] = torch.cat(pixels)
        out["image_grid_thw"] = torch.tensor(grids)
    return out


# --- more families: LLaVA-NeXT, Qwen2-VL, Qwen3-VL, and video inputs ---------------------------


def _text_config(layers: int) -> dict:
    return dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=PAD,
    )


def _finish(model, attn: str):
    model = model.eval()
    model.generation_config.pad_token_id = PAD
    return model


def tiny_llava_next(attn: str = "sdpa", layers: int = 6, seed: int = 0):
    """A LLaVA-NeXT with 28-px tiles (a 2x2 base grid per tile) and anyres pinpoints up to 2x2 tiles."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=42, patch_size=14, projection_dim=32,
    )
    config = LlavaNextConfig(
        vision_config=vision, text_config=LlamaConfig(**_text_config(layers)), image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
        image_grid_pinpoints=[[42, 84], [84, 42], [84, 84]],
    )
    config._attn_implementation = attn
    return _finish(LlavaNextForConditionalGeneration(config), attn)


def llava_next_inputs(model, texts: list[tuple[int, list[tuple[int, int]], int]], seed: int = 0) -> dict:
    """Left-padded LLaVA-NeXT inputs. Each sample is (n_before, [(height, width) px per image], n_after).

    Each image's token count (base tile, unpadded high-res grid and its newline column) is what
    the model itself produces for that image size.
    """
    g = torch.Generator().manual_seed(seed)
    vc = model.config.vision_config
    sizes = [size for _, images, _ in texts for size in images]
    image_sizes = torch.tensor(sizes, dtype=torch.long).reshape(-1, 2)
    out: dict = {}
    counts: list[int] = []
    if sizes:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        patches = [image_size_to_num_patches(s, model.config.image_grid_pinpoints, vc.image_size) for s in sizes]
        pixels = torch.zeros(len(sizes), max(patches), 3, vc.image_size, vc.image_size)
        for i, n in enumerate(patches):
            pixels[i, :n] = torch.randn(n, 3, vc.image_size, vc.image_size, generator=g)
        with torch.no_grad():
            features = model.model.get_image_features(pixels, image_sizes, return_dict=True).pooler_output
        counts = [f.shape[0] for f in features]
        out.update(pixel_values=pixels, image_sizes=image_sizes)
    rows, cursor = [], 0
    for before, images, after in texts:
        ids = torch.randint(2, 80, (before,), generator=g).tolist()
        for _ in images:
            ids += [IMAGE_TOKEN] * counts[cursor] + torch.randint(2, 80, (2,), generator=g).tolist()
            cursor += 1
        ids += torch.randint(2, 80, (after,), generator=g).tolist()
        rows.append(ids)
    return {**left_pad(rows), **out}


_QWEN_IDS = dict(
    image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, bos_token_id=None, eos_token_id=None,
    vision_start_token_id=92, vision_end_token_id=93,
)


def tiny_qwen2_vl(attn: str = "sdpa", layers: int = 6, seed: int = 0):
    """A Qwen2-VL with a 1-block vision tower (patch 14, merge 2) and an M-RoPE LM."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    text = _text_config(layers)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=dict(
            depth=1, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2,
        ),
        **_QWEN_IDS,
    )
    config._attn_implementation = attn
    return _finish(Qwen2VLForConditionalGeneration(config), attn)


def tiny_qwen3_vl(attn: str = "sdpa", layers: int = 6, seed: int = 0, deepstack: tuple[int, ...] = (0, 1, 2)):
    """A Qwen3-VL whose vision tower feeds DeepStack features after LM layers 0..len(deepstack)-1."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    text = _text_config(layers)
    text.update(head_dim=16, bos_token_id=None, eos_token_id=None, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2], "mrope_interleaved": True,
    })
    config = Qwen3VLConfig(
        text_config=text,
        vision_config=dict(
            depth=max(deepstack) + 1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
            deepstack_visual_indexes=list(deepstack),
        ),
        **_QWEN_IDS,
    )
    config._attn_implementation = attn
    return _finish(Qwen3VLForConditionalGeneration(config), attn)


def qwen_media_inputs(model, samples: list[list], seed: int = 0) -> dict:
    """Left-padded Qwen inputs with images and videos in any order.

    Each sample is a list of parts: an int n (n random text tokens), ("image", h, w) or
    ("video", t, h, w), grids in patches before the 2x2 merge (t in temporal patches). Qwen3-VL
    videos are laid out frame by frame with a two-token timestamp before each frame, as its
    processor does; the other families get one run of t*h*w/4 video tokens.
    """
    g = torch.Generator().manual_seed(seed)
    vc = model.config.vision_config
    merge = vc.spatial_merge_size
    patch_dim = 3 * vc.temporal_patch_size * vc.patch_size**2
    per_frame = model.config.model_type == "qwen3_vl"
    rows: list[list[int]] = []
    grids: dict[str, list[list[int]]] = {"image": [], "video": []}
    pixels: dict[str, list[torch.Tensor]] = {"image": [], "video": []}
    for parts in samples:
        ids: list[int] = []
        for part in parts:
            if isinstance(part, int):
                ids += torch.randint(2, 80, (part,), generator=g).tolist()
                continue
            kind, *thw = part
            t, h, w = (1, *thw) if kind == "image" else thw
            token = IMAGE_TOKEN if kind == "image" else VIDEO_TOKEN
            frame = [92] + [token] * (h * w // merge**2) + [93]
            if kind == "video" and per_frame:
                for _ in range(t):
                    ids += torch.randint(2, 80, (2,), generator=g).tolist() + frame
            else:
                ids += [92] + [token] * (t * h * w // merge**2) + [93]
            grids[kind].append([t, h, w])
            pixels[kind].append(torch.randn(t * h * w, patch_dim, generator=g))
        rows.append(ids)
    out = left_pad(rows)
    ids = out["input_ids"]
    out["mm_token_type_ids"] = (ids == IMAGE_TOKEN).int() + 2 * (ids == VIDEO_TOKEN).int()
    if grids["image"]:
        out.update(pixel_values=torch.cat(pixels["image"]), image_grid_thw=torch.tensor(grids["image"]))
    if grids["video"]:
        out.update(pixel_values_videos=torch.cat(pixels["video"]), video_grid_thw=torch.tensor(grids["video"]))
    return out
