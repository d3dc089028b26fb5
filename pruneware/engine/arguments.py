"""The arguments of `prune` / `attach` (and `Session`), checked when the session is created.

Without these checks a bad seed or budget surfaced only inside the first forward (torch's
`manual_seed` overflow, a `TypeError` from the budget solver) and a bad `on_report` only after
that forward had already run. Each error names the argument and its valid values.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal

from pruneware.errors import ArgumentError

# torch.Generator.manual_seed accepts exactly this range (negative seeds are remapped by torch).
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
SEED_STRIDE = 1_000_003  # stage i of a session seeded s draws from seed s * SEED_STRIDE + i
SmallImages = Literal["error", "keep"]
SMALL_IMAGES: tuple[str, ...] = ("error", "keep")


def check_seed(seed: Any) -> int:
    """`seed` as an int; raises ArgumentError unless it is an integer torch can seed with."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ArgumentError(f"seed must be an integer in [-2**63, 2**64 - 1] (torch's seed range), got {seed!r}")
    seed = int(seed)
    if not SEED_MIN <= seed <= SEED_MAX:
        raise ArgumentError(f"seed must be an integer in [-2**63, 2**64 - 1] (torch's seed range), got {seed}")
    return seed


def check_avg_tokens(avg_tokens: Any) -> float | None:
    """`avg_tokens` as a float, or None; raises ArgumentError unless it is a positive finite number."""
    if avg_tokens is None:
        return None
    if isinstance(avg_tokens, bool) or not isinstance(avg_tokens, numbers.Real):
        raise ArgumentError(f"avg_tokens must be a positive number of visual tokens per layer, or None; got {avg_tokens!r}")
    value = float(avg_tokens)
    if not (math.isfinite(value) and value > 0):
        raise ArgumentError(f"avg_tokens must be a positive finite number of visual tokens per layer, got {avg_tokens!r}")
    return value


def check_on_report(on_report: Any) -> None:
    if on_report is not None and not callable(on_report):
        raise ArgumentError(f"on_report must be a callable taking a Report, or None; got {on_report!r}")


def check_small_images(small_images: Any) -> SmallImages:
    """`small_images` is one of SMALL_IMAGES (see `PlanSource.sample_plans`)."""
    if not isinstance(small_images, str) or small_images not in SMALL_IMAGES:
        raise ArgumentError(f"small_images must be one of {SMALL_IMAGES}, got {small_images!r}")
    return small_images  # type: ignore[return-value]


def check_session_arguments(
    seed: Any, avg_tokens: Any, on_report: Any, small_images: Any,
) -> tuple[int, float | None, SmallImages]:
    """All of a session's scalar arguments, checked before anything is built or installed:
    (seed, avg_tokens, small_images) normalised to int, float | None and str."""
    seed = check_seed(seed)
    avg = check_avg_tokens(avg_tokens)
    check_on_report(on_report)
    return seed, avg, check_small_images(small_images)


def stage_seed(seed: int, stage_index: int) -> int:
    """The seed stage `stage_index` draws from: `seed * SEED_STRIDE + stage_index`, reduced
    modulo 2**64 only when that falls outside torch's seed range (so every valid session seed
    works, and seeds that worked before keep their streams)."""
    derived = seed * SEED_STRIDE + stage_index
    return derived if SEED_MIN <= derived <= SEED_MAX else derived % 2**64
