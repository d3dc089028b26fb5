"""Tiny random-weight LLaVA and Qwen2.5-VL models and hand-built inputs for tests.

Nothing here touches the network: models are built from configs and inputs are
assembled token by token, so the tests control exactly where visual tokens sit.
"""

from __future__ import annotations

import torch
from transformers import LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

from pruneware.models.tiny_configs import tiny_config

VOCAB = 96
IMAGE_TOKEN = 90
VIDEO_TOKEN = 91
PAD = 0
_QWEN_IDS = dict(ids={"image": IMAGE_TOKEN, "video": VIDEO_TOKEN}, bos_token_id=None, eos_token_id=None)


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
    config = tiny_config(
        "llava", layers=layers, max_positions=2048, text={"pad_token_id": PAD}, vision={"image_size": image_size},
        ids={"image": IMAGE_TOKEN}, vision_feature_layer=-1, vision_feature_select_strategy="default",
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
    config = tiny_config("qwen2.5-vl", layers=layers, text={"pad_token_id": PAD}, **_QWEN_IDS)
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


def _finish(model, attn: str):
    model = model.eval()
    model.generation_config.pad_token_id = PAD
    return model


def tiny_llava_next(attn: str = "sdpa", layers: int = 6, seed: int = 0):
    """A LLaVA-NeXT with 42-px tiles (a 3x3 patch grid per tile) and anyres pinpoints up to 2x2 tiles."""
    from transformers import LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    config = tiny_config(
        "llava-next", layers=layers, text={"pad_token_id": PAD}, vision_feature_layer=-1,
        vision_feature_select_strategy="default", image_grid_pinpoints=[[42, 84], [84, 42], [84, 84]],
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


def tiny_qwen2_vl(attn: str = "sdpa", layers: int = 6, seed: int = 0):
    """A Qwen2-VL with a 1-block vision tower (patch 14, merge 2) and an M-RoPE LM."""
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    config = tiny_config("qwen2-vl", layers=layers, text={"pad_token_id": PAD}, **_QWEN_IDS)
    config._attn_implementation = attn
    return _finish(Qwen2VLForConditionalGeneration(config), attn)


def tiny_qwen3_vl(attn: str = "sdpa", layers: int = 6, seed: int = 0, deepstack: tuple[int, ...] = (0, 1, 2)):
    """A Qwen3-VL whose vision tower feeds DeepStack features after LM layers 0..len(deepstack)-1."""
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    config = tiny_config(
        "qwen3-vl", layers=layers, mrope=[4, 2, 2], text=dict(pad_token_id=PAD, head_dim=16, bos_token_id=None, eos_token_id=None),
        vision=dict(depth=max(deepstack) + 1, deepstack_visual_indexes=list(deepstack)), **_QWEN_IDS,
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
