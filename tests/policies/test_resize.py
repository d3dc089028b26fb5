"""`resize`: on Qwen a pruned run equals the unpruned model given the image at the lower
resolution; on LLaVA the kept tokens are the average-pooled grid."""

from __future__ import annotations

import pytest
import torch

import pruneware
from pruneware import PlanError
from pruneware.adapters.vision import resized_grid
from pruneware.policies.pooling import pooled_shape
from tests.reference import pad_batch, uncached_greedy
from tests.tiny import IMAGE_TOKEN, left_pad, llava_inputs, tiny_llava, tiny_qwen

PATCH, MERGE, TEMPORAL = 14, 2, 2


def patchify(image: torch.Tensor) -> torch.Tensor:
    """[C, H, W] -> [H/14 * W/14, C*2*14*14] in Qwen's processor order (see Qwen2VLImageProcessor.patchify)."""
    c, h, w = image.shape
    gh, gw = h // PATCH, w // PATCH
    x = image.reshape(c, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH).permute(1, 4, 2, 5, 0, 3, 6)
    return x.unsqueeze(5).expand(-1, -1, -1, -1, -1, TEMPORAL, -1, -1).reshape(gh * gw, -1)


def qwen_sample(images: list[torch.Tensor], before: int = 4, after: int = 6, seed: int = 0) -> dict:
    """One Qwen sample holding `images` ([C, H, W] each, sides multiples of 28)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 80, (before,), generator=g).tolist()
    grids, pixels = [], []
    for image in images:
        h, w = image.shape[1] // PATCH, image.shape[2] // PATCH
        ids += [92] + [IMAGE_TOKEN] * (h * w // MERGE**2) + [93]
        grids.append([1, h, w])
        pixels.append(patchify(image))
    ids += torch.randint(2, 80, (after,), generator=g).tolist()
    out = left_pad([ids])
    out["mm_token_type_ids"] = (out["input_ids"] == IMAGE_TOKEN).int()
    out.update(pixel_values=torch.cat(pixels), image_grid_thw=torch.tensor(grids))
    return out


def smaller(image: torch.Tensor, budget: int) -> torch.Tensor:
    """The image at the resolution whose token count fits `budget` (max_pixels = budget * 28^2)."""
    side = PATCH * MERGE
    ph, pw = resized_grid(image.shape[1] // side, image.shape[2] // side, budget)
    return torch.nn.functional.interpolate(
        image[None], size=(ph * side, pw * side), mode="bicubic", align_corners=False, antialias=True
    )[0]


def images(seed: int, *sizes: tuple[int, int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h * PATCH * MERGE, w * PATCH * MERGE, generator=g) for h, w in sizes]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_qwen_resize_is_the_model_on_the_smaller_image(attn):
    model = tiny_qwen(attn)
    pictures = [images(1, (4, 6))[0], images(2, (6, 6))[0]]
    samples = [qwen_sample([p], seed=i) for i, p in enumerate(pictures)]
    reference = [qwen_sample([smaller(p, 6)], seed=i) for i, p in enumerate(pictures)]
    batch = pad_batch(samples)
    with pruneware.prune(model, "resize@pre:6") as run:
        with torch.no_grad():
            pruned = model(**batch).logits[:, -1]
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert [k.numel() for k in run.report.stages[0].kept] == [6, 4]  # 2x3 and 2x2 grids (smart_resize floors)
    for b, ref in enumerate(reference):
        with torch.no_grad():
            expected = model(**ref).logits[0, -1]
        torch.testing.assert_close(pruned[b], expected, atol=1e-4, rtol=1e-4)
        alone = model.generate(**ref, max_new_tokens=3, do_sample=False)
        assert torch.equal(generated[b, -3:], alone[0, -3:])


def test_qwen_resize_runs_the_tower_on_fewer_patches_and_restores_it():
    model = tiny_qwen("sdpa")
    sample = qwen_sample(images(3, (6, 8)))
    seen = []
    handle = model.model.visual.register_forward_pre_hook(lambda m, a, k: seen.append(k["grid_thw"].tolist()), with_kwargs=True)
    try:
        with pruneware.prune(model, "resize@pre:0.25") as run:
            model.generate(**sample, max_new_tokens=2, do_sample=False)
    finally:
        handle.remove()
    assert run.report.stages[0].kept[0].numel() == 12 == resized_grid(6, 8, 12)[0] * resized_grid(6, 8, 12)[1]
    assert not model.model.visual._forward_pre_hooks and not model.model.visual._forward_hooks
    # Seen before pruneware's pre-hook ran: the input's grid; the tower then ran at 3x4 tokens.
    assert seen == [[[1, 12, 16]]]


def test_qwen_resize_cached_generate_equals_uncached():
    model = tiny_qwen("sdpa")
    sample = qwen_sample(images(4, (4, 6), (6, 6)))
    with pruneware.prune(model, "resize@pre:0.3"):
        out = model.generate(**sample, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        ids, uncached = uncached_greedy(model, sample, 4)
    assert torch.equal(out.sequences, ids)
    torch.testing.assert_close(torch.stack(out.logits, 1), uncached, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("budget", [12, 30])
def test_qwen_resize_refuses_a_count_budget_over_several_images_before_the_forward(budget):
    """A PlanError before the vision tower or any layer runs (issue 33, row 10), under a plain
    forward and under generate (which encodes the pixels first, but runs no layer)."""
    model = tiny_qwen("sdpa")
    sample = qwen_sample(images(5, (4, 6), (6, 6)))
    calls = []
    hooks = [model.model.visual.register_forward_hook(lambda *_: calls.append("tower")),
             model.model.language_model.layers[0].register_forward_hook(lambda *_: calls.append("layer"))]
    try:
        with pruneware.prune(model, f"resize@pre:{budget}"):
            with pytest.raises(PlanError, match=r"sample 0 has 2 images.*ratio budget \(e.g. resize@pre:0.25\)"):
                model(**sample)
            assert calls == []
            with pytest.raises(PlanError, match=r"sample 0 has 2 images"):
                model.generate(**sample, max_new_tokens=2, do_sample=False)
            assert "layer" not in calls
    finally:
        for hook in hooks:
            hook.remove()


def test_llava_resize_average_pools_the_grid():
    model = tiny_llava("sdpa", image_size=112)  # an 8x8 grid
    batch = llava_inputs(model, [(5, 1, 9), (3, 2, 4)])
    with torch.no_grad():
        features = model.model.get_image_features(batch["pixel_values"], vision_feature_layer=-1, vision_feature_select_strategy="default").pooler_output
    with pruneware.prune(model, "resize@pre:16") as run, torch.no_grad():
        model(**batch)
    batch_kept = run.report.stages[0].kept
    image = 0
    for b, (before, n_images, after) in enumerate([(5, 1, 9), (3, 2, 4)]):
        sample = llava_inputs(model, [(before, n_images, after)])
        sample["input_ids"] = batch["input_ids"][b : b + 1, batch["attention_mask"][b] == 1]
        sample["attention_mask"] = torch.ones_like(sample["input_ids"])
        sample["pixel_values"] = batch["pixel_values"][image : image + n_images]
        seen = {}

        def record(module, args, kwargs):
            seen.setdefault("embeds", kwargs["inputs_embeds"][0])

        with pruneware.prune(model, "resize@pre:16") as run, torch.no_grad():
            handle = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
            try:
                model(**sample)
            finally:
                handle.remove()
        ids = sample["input_ids"][0]
        positions = (ids == IMAGE_TOKEN).nonzero().squeeze(1)
        ph, pw = (4, 4) if n_images == 1 else (3, 2)  # 16 tokens: a 4x4 grid, or 8 per image (pooled_shape)
        assert pooled_shape(8, 8, 16 // n_images) == (ph, pw)
        slots, pooled = [], []
        for i in range(n_images):
            grid = features[image].reshape(8, 8, -1).permute(2, 0, 1)[None]
            pooled.append(torch.nn.functional.adaptive_avg_pool2d(grid, (ph, pw))[0].permute(1, 2, 0).reshape(ph * pw, -1))
            firsts = torch.tensor([r * 8 // ph * 8 + c * 8 // pw for r in range(ph) for c in range(pw)])
            slots.append(positions[i * 64 + firsts])
            image += 1
        kept = run.report.stages[0].kept[0]
        assert torch.equal(kept, torch.cat(slots))
        offset = (batch["attention_mask"][b] == 0).sum()
        assert torch.equal(batch_kept[b], kept + offset)  # the padded batch keeps the same tokens
        rows = torch.cat([(ids != IMAGE_TOKEN).nonzero().squeeze(1), kept]).sort().values  # the pruned sequence
        torch.testing.assert_close(seen["embeds"][torch.isin(rows, kept)], torch.cat(pooled), atol=1e-5, rtol=1e-5)


def test_resize_is_a_pre_stage_with_a_budget():
    model = tiny_llava("sdpa")
    with pytest.raises(pruneware.PlanError, match="runs only at 'pre'"):
        pruneware.prune(model, "resize@2:0.5")
    with pytest.raises(pruneware.PlanError, match="budget >= 1"):
        pruneware.prune(model, "resize@pre:0")
