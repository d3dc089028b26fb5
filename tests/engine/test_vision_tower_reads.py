"""`reads_to_positions`: the vision tower's reads, per image or one tensor per call, laid over the
input positions in call order (the images' tokens appear in that order, sample after sample)."""

from __future__ import annotations

import pytest
import torch

from pruneware.engine.vision_tower_reads import VisionRead, reads_to_positions


def _layout() -> tuple[torch.Tensor, list[list[tuple[int, int]]]]:
    """Two samples: sample 0 holds images 0 (2x2) and 1 (1x2); sample 1 holds image 2 (2x2)."""
    image_ids = torch.tensor([[-1, 0, 0, 0, 0, -1, 1, 1, -1], [-1, -1, -1, 0, 0, 0, 0, -1, -1]])
    return image_ids, [[(2, 2), (1, 2)], [(2, 2)]]


@pytest.mark.parametrize("form", ["per image", "one tensor per call", "one call"])
def test_reads_land_on_their_images_positions_in_call_order(form):
    image_ids, grids = _layout()
    scores = [torch.arange(4.0), torch.arange(10.0, 12.0), torch.arange(20.0, 24.0)]
    keys = [s[:, None] * torch.tensor([1.0, -1.0]) for s in scores]
    if form == "per image":
        reads = [VisionRead(scores[:2], keys[:2], None, 2), VisionRead(scores[2:], keys[2:], None, 1)]
    elif form == "one tensor per call":  # [sum of n] and [n_images, n] forms
        reads = [VisionRead(torch.cat(scores[:2]), torch.cat(keys[:2]), None, 2),
                 VisionRead(scores[2][None], keys[2][None], None, 1)]
    else:
        reads = [VisionRead(torch.cat(scores), torch.cat(keys), None, 3)]
    score_map, key_map, tower_grids = reads_to_positions(reads, image_ids, grids, want_keys=True)
    visual = image_ids >= 0
    assert torch.equal(score_map[visual], torch.cat(scores)) and (score_map[~visual] == 0).all()
    assert torch.equal(key_map[visual], torch.cat(keys)) and (key_map[~visual] == 0).all()
    assert tower_grids is None


def test_a_count_that_does_not_match_the_input_is_refused():
    image_ids, grids = _layout()
    with pytest.raises(ValueError, match="scored 9 visual tokens but the input holds 10"):
        reads_to_positions([VisionRead(torch.zeros(9), None, None, 3)], image_ids, grids, want_keys=False)
