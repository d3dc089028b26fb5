"""Plans and stages: what to prune, where, and how much.

A plan is an ordered list of stages. Each stage names a policy, a place (`pre`, before the
language model, or a decoder-layer index K, before layer K), a budget and a positions mode.
Plans parse from and format to one string, and the two round-trip::

    divprune@pre:0.5,random@20:0.2          # two stages
    random@3:64:compact                     # keep 64 tokens, re-index positions
    crosslmm[factor=3]@pre:1.0              # policy parameters in brackets
    random@vit2:0.5,random@8:0.5            # inside the vision tower, before its block 2
    pixel-dedup@pre-vit:0.75                # on the patches, before the vision tower

Vision-side places (`pre-vit`, `vitK`) come first, in that order; their budgets apply per image
(each image's units are chosen when the tower encodes it, before its sample is known).

Budgets: a float (written with a dot) is a ratio in (0, 1] of the sample's *original*
number of visual tokens; an integer is a count >= 0; `*0.6` is a ratio of the visual tokens
the stage *receives* (what the previous stage left), rounded down, as the official AdaptInfer
Qwen2-VL code computes its stage budgets. A stage never keeps more tokens than the previous
stage left. Each image in a sample keeps at least one token unless the stage's budget is 0: a
budget of 0 drops every visual token (the official AdaptInfer "32" schedule ends with 0).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
import struct
from decimal import Decimal
from typing import Literal

from pruneware.errors import PlanError
from pruneware.policies import get_policy

__all__ = ["Plan", "PlanError", "Stage", "writes_budgets"]

Where = Literal["pre", "pre-vit"] | str | int  # a str "vitK" is before vision-tower block K
VISION_PLACES = ("pre-vit", "vitK")
_VIT_RE = re.compile(r"^vit(\d+)$")
PositionsMode = Literal["keep", "compact"]
POSITIONS_MODES = ("keep", "compact")

_STAGE_RE = re.compile(
    r"^(?P<policy>[A-Za-z][\w\-]*)(?:\[(?P<params>[^\]]*)\])?"
    r"@(?P<where>pre-vit|pre|vit\d+|\d+)(?::(?P<budget>[^:]+))?(?::(?P<mode>[a-z]+))?$"
)


def writes_budgets(text: str) -> bool:
    """True when a plan string gives any stage an explicit budget ("random@4:0.25", not "random@4")."""
    return any((m := _STAGE_RE.match(part.strip())) is not None and m["budget"] is not None for part in text.split(","))


def _float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _format_number(value: float | int) -> str:
    """A float in positional notation with a dot (5e-05 -> "0.00005": the shortest digits that
    read back as the same float), an int as is, so the grammar tells the two apart."""
    if isinstance(value, float):
        text = format(Decimal(repr(float(value))), "f")
        return text if "." in text else text + ".0"
    return str(value)


def _format_param(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return _format_number(value) if isinstance(value, float) else str(value)


def _check_param(key: object, value: object) -> None:
    """A parameter the grammar can write and read back as the same key and value."""
    if not isinstance(key, str) or _PARAM_KEY_RE.match(key) is None:
        raise PlanError(f"parameter name {key!r} must be a word (letters, digits, '_' or '-')")
    if isinstance(value, float) and not math.isfinite(value):
        raise PlanError(f"parameter {key}={value!r}: a number must be finite")
    if not isinstance(value, str | int | float) or (
        isinstance(value, str) and (_parse_param(value) != value or value != value.strip() or set(value) & set(";],"))
    ):
        raise PlanError(
            f"parameter {key}={value!r} cannot be written in a plan string: use a number, a bool, or text "
            "without ';', ']' or ',' that does not read as a number or true/false"
        )


_PARAM_KEY_RE = re.compile(r"^[A-Za-z_][\w\-]*$")


def _parse_param(text: str) -> str | int | float | bool:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text in ("true", "false"):
        return text == "true"
    return text


@dataclass(frozen=True)
class Stage:
    """One pruning step.

    Attributes:
        policy: a registered policy name (see `pruneware.policies.available()`).
        where: "pre" (on the projected visual embeddings, before the LLM) or a layer index K:
            the stage runs before decoder layer K, using what layer K-1 saw.
        budget: a ratio in (0, 1] of the original visual tokens, or a count >= 0; with
            `relative`, a ratio in (0, 1] of the visual tokens the stage receives.
        positions: "keep" keeps each token's original position; "compact" re-indexes the
            kept sequence (1-D RoPE models only).
        params: extra policy parameters, e.g. {"factor": 3}.
        relative: the ratio applies to the current count, rounded down (written `*0.6`).
    """

    policy: str
    where: Where = "pre"
    budget: float | int = 0.5
    positions: PositionsMode = "keep"
    params: tuple[tuple[str, str | int | float | bool], ...] = field(default=())
    relative: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.policy, str) or not self.policy:
            raise PlanError(f"policy must be a non-empty name, got {self.policy!r}")
        vision = self.where == "pre-vit" or (isinstance(self.where, str) and _VIT_RE.match(self.where) is not None)
        if self.where != "pre" and not vision and not (isinstance(self.where, int) and not isinstance(self.where, bool)):
            raise PlanError(
                f"where must be 'pre-vit', 'vitK' (before vision-tower block K), 'pre' or a decoder layer "
                f"index >= 0, got {self.where!r}"
            )
        if vision and self.positions != "keep":
            raise PlanError(f"a vision-side stage ({self.where}) keeps its tokens' positions: drop ':{self.positions}'")
        if isinstance(self.where, int) and self.where < 0:
            raise PlanError(f"layer index must be >= 0, got {self.where}")
        budget = self.budget
        if isinstance(budget, bool) or not isinstance(budget, int | float):
            raise PlanError(f"budget must be a ratio in (0, 1] or a count >= 0, got {budget!r}")
        if isinstance(budget, float) and not 0.0 < budget <= 1.0:
            raise PlanError(f"budget ratio must be in (0, 1], got {budget}")
        if isinstance(budget, int) and budget < 0:
            raise PlanError(f"budget count must be >= 0, got {budget}")
        if self.relative and not isinstance(budget, float):
            raise PlanError(f"a relative budget ('*r') is a ratio in (0, 1], got {budget!r}")
        if self.positions not in POSITIONS_MODES:
            raise PlanError(f"positions must be one of {POSITIONS_MODES}, got {self.positions!r}")
        params = tuple(sorted(self.params.items() if isinstance(self.params, dict) else self.params))
        if len({key for key, _ in params}) != len(params):
            raise PlanError(f"a parameter is given twice in {params}")
        object.__setattr__(self, "params", params)  # sorted, as parsing gives them
        for key, value in params:
            _check_param(key, value)

    @property
    def layer(self) -> int:
        """The first decoder layer that sees the pruned sequence (0 for `pre` and vision-side stages)."""
        return self.where if isinstance(self.where, int) else 0

    @property
    def in_vision(self) -> bool:
        """Runs in or before the vision tower (`pre-vit` or `vitK`)."""
        return isinstance(self.where, str) and self.where != "pre"

    @property
    def vit_block(self) -> int | None:
        """K for a `vitK` stage (0 for `pre-vit`, which runs before block 0 on the raw patches); None otherwise."""
        if self.where == "pre-vit":
            return 0
        match = _VIT_RE.match(self.where) if isinstance(self.where, str) else None
        return int(match[1]) if match else None

    def keep_count(self, n_visual: int, current: int | None = None) -> int:
        """Tokens this stage keeps of a sample's original `n_visual` visual tokens, when it
        receives `current` of them (default: all)."""
        if n_visual == 0:
            return 0
        if self.relative:
            current = n_visual if current is None else current
            # The official code multiplies an int64 tensor by a Python float: float32, truncated.
            return min(current, int(_float32(_float32(current) * _float32(self.budget))))
        if isinstance(self.budget, float):
            return max(1, min(n_visual, round(self.budget * n_visual)))
        return min(n_visual, self.budget)

    def __str__(self) -> str:
        params = ";".join(f"{k}={_format_param(v)}" for k, v in self.params)
        text = self.policy + (f"[{params}]" if params else "")
        text += f"@{self.where}:{'*' if self.relative else ''}{_format_number(self.budget)}"
        return text + (":compact" if self.positions == "compact" else "")

    @classmethod
    def parse(cls, text: str) -> Stage:
        match = _STAGE_RE.match(text.strip())
        if not match:
            raise PlanError(
                f"malformed stage {text!r}: expected 'policy@where:budget[:keep|compact]' with where one of "
                "'pre-vit', 'vitK', 'pre' or a decoder layer K, e.g. 'random@20:0.25', 'divprune@pre:64' or 'random@vit2:0.5'"
            )
        where: Where = match["where"] if not match["where"].isdigit() else int(match["where"])
        budget_text = match["budget"] or "0.5"
        relative = budget_text.startswith("*")
        budget_text = budget_text.removeprefix("*")
        try:
            is_ratio = "." in budget_text or "e" in budget_text.lower()  # 0.25, 5e-05
            budget: float | int = float(budget_text) if is_ratio else int(budget_text)
        except ValueError:
            raise PlanError(
                f"malformed budget {budget_text!r} in {text!r}: use a ratio like 0.25, a count like 64, "
                "or a ratio of the current count like *0.6"
            ) from None
        params = {}
        for item in filter(None, (match["params"] or "").split(";")):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise PlanError(f"malformed parameter {item!r} in {text!r}: expected key=value")
            params[key.strip()] = _parse_param(value.strip())
        return cls(match["policy"], where, budget, match["mode"] or "keep", tuple(sorted(params.items())), relative)


@dataclass(frozen=True)
class Plan:
    """An ordered list of stages, checked against the policy registry on creation.

    `stages` holds the language-model side (`pre` and decoder layers), `vision` the stages in
    and before the vision tower (`pre-vit`, `vitK`); vision-side stages given in `stages` move
    to `vision`, so `Plan(Plan.parse(s).all_stages)` is the same plan.
    """

    stages: tuple[Stage, ...]
    vision: tuple[Stage, ...] = ()

    def __post_init__(self) -> None:
        given = tuple(self.vision) + tuple(self.stages)
        vision = tuple(s for s in given if s.in_vision)
        object.__setattr__(self, "stages", tuple(s for s in given if not s.in_vision))
        object.__setattr__(self, "vision", vision)
        if not given:
            raise PlanError("a plan needs at least one stage")
        for stage in given:
            get_policy(stage.policy)  # raises with the list of valid names
        blocks = [(s.where != "pre-vit", s.vit_block) for s in vision]
        if blocks != sorted(blocks) or len(set(blocks)) != len(blocks):
            raise PlanError(
                f"vision-side stages must be 'pre-vit' first, then 'vitK' in increasing K, one per place, got "
                f"{','.join(str(s) for s in vision)}"
            )
        layers = [s.layer for s in self.stages]
        if layers != sorted(layers) or len([s for s in self.stages if s.where == "pre"]) > 1:
            raise PlanError(f"stages must be in increasing layer order with at most one 'pre' stage, got {self}")
        if len(set(layers)) != len(layers):
            raise PlanError(f"two stages at the same place in {self}")

    @property
    def all_stages(self) -> tuple[Stage, ...]:
        """Every stage in run order: the vision side, then the language-model side."""
        return self.vision + self.stages

    @classmethod
    def parse(cls, text: str) -> Plan:
        if not isinstance(text, str) or not text.strip():
            raise PlanError(f"empty plan string {text!r}")
        return cls(tuple(Stage.parse(part) for part in text.split(",")))

    def __str__(self) -> str:
        text = self.__dict__.get("_text")  # formatted once: every forward's report names its plan
        if text is None:
            text = ",".join(str(s) for s in self.all_stages)
            object.__setattr__(self, "_text", text)
        return text

    def validate_for(self, n_layers: int, rope: Literal["1d", "mrope"]) -> None:
        """Check layer indices against a model of `n_layers` decoder layers and its RoPE kind."""
        for stage in self.stages:
            if stage.where != "pre" and not 0 <= stage.where < n_layers:
                raise PlanError(
                    f"stage {stage} prunes before layer {stage.where}, but the model has {n_layers} "
                    f"decoder layers: use 'pre' or a layer in 0..{n_layers - 1}"
                )
            if stage.positions == "compact" and rope == "mrope":
                raise PlanError(
                    f"stage {stage}: 'compact' positions are only defined for 1-D RoPE models; "
                    "this model uses M-RoPE, use 'keep'"
                )

    def entering_llm(self, n_visual: int) -> int:
        """Visual tokens a sample with `n_visual` of them brings into the language model: what the
        vision-side stages (`pre-vit`, `vitK`) leave (at most: `pixelprune` may keep fewer)."""
        current = n_visual
        for stage in self.vision:
            current = min(current, stage.keep_count(n_visual, current))
        return current

    def keep_counts(self, n_visual: int) -> list[int]:
        """Visual tokens left after each language-model-side stage, for a sample with `n_visual`
        visual tokens (after the vision-side stages, `entering_llm`)."""
        counts, current = [], self.entering_llm(n_visual)
        for stage in self.stages:
            current = min(current, stage.keep_count(n_visual, current))
            counts.append(current)
        return counts

    def avg_visual_tokens(self, n_visual: int, n_layers: int) -> float:
        """Average visual tokens per decoder layer for a sample with `n_visual` visual tokens."""
        total, current, start = 0.0, self.entering_llm(n_visual), 0
        for stage, count in zip(self.stages, self.keep_counts(n_visual), strict=True):
            total += current * (stage.layer - start)
            current, start = count, stage.layer
        return (total + current * (n_layers - start)) / n_layers
