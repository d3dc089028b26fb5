"""benchmarks/cpu_overhead.py refuses plans its native lower bound cannot model, before building anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("plan", ["random@vit1:0.5", "pixelprune@pre-vit:0.5", "random@vit1:0.5,fastv@2:0.5"])
def test_vision_side_plans_get_a_clear_error(plan):
    run = subprocess.run([sys.executable, "benchmarks/cpu_overhead.py", "--plans", plan, "--rounds", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert "vision-side stage (pre-vit, vitK) has none" in run.stderr and "launch_budget.py" in run.stderr
    assert "Traceback" not in run.stderr
