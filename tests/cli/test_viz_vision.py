"""`pruneware viz` draws vision-side stages (`vitK`, `pre-vit`) like any other: one panel each,
with exactly the units the stage dropped dimmed on the token grid."""

from __future__ import annotations

import json

import pytest
from PIL import Image, ImageStat
from typer.testing import CliRunner

from pruneware.cli import app
from pruneware.models import available


@pytest.mark.skipif("tiny-llava" not in available(), reason="tiny-llava has no trained weights here")
@pytest.mark.parametrize("plan", ["divprune@vit1:0.25", "random@pre-vit:0.25"])
def test_viz_draws_a_vision_side_stage(tmp_path, plan):
    out = tmp_path / "viz.png"
    result = CliRunner().invoke(app, ["viz", "--model", "tiny-llava", "--plan", plan, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    (stage,) = payload["stages"]
    assert stage["title"] == f"{plan.split(':')[0]}: 144/576" and stage["kept"] == 144
    rows, cols = payload["grid"]
    with Image.open(out) as image:
        gray = image.convert("L")
    width = (gray.width - 20) // 2  # two panels (original, the stage), 10 px apart
    cell_w, cell_h = width / cols, (gray.height - 24) / rows

    def brightness(panel: int, r: int, c: int) -> float:
        x, y = panel * (width + 10) + c * cell_w, 24 + r * cell_h
        return ImageStat.Stat(gray.crop((int(x) + 2, int(y) + 2, int(x + cell_w) - 2, int(y + cell_h) - 2))).mean[0]

    cells = [(r, c) for r in range(rows) for c in range(cols)]
    visible = [rc for rc in cells if brightness(0, *rc) > 30]  # dimming a black cell shows nothing
    dimmed = [rc for rc in visible if brightness(1, *rc) < 0.6 * brightness(0, *rc)]
    kept_visible = len(visible) - len(dimmed)
    assert len(cells) - len(visible) < 30
    assert 144 - (len(cells) - len(visible)) <= kept_visible <= 144  # the kept units are the ones left bright
