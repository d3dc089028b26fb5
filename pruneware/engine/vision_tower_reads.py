"""What pre-LLM policies read from the vision tower, and the Qwen `resize` baseline's cheaper pass.

Installed by a Session for its lifetime when a plan's `pre` policy declares `vision_reads`
(and removed with it):
  - a registered attention function wraps the vision tower's backend (sdpa, flash, eager), as
    attention_capture.py does for the language model; at the adapter's score layer it reduces q and k to
    one score and one head-averaged key per patch, with the scores kernel (no L x L matrix);
  - a pre-hook and a forward hook on the vision encoder delimit one call: at its end the
    adapter puts what the call read in image order, and the request tracker keeps it until
    the `pre` stage (`generate()` encodes the pixels before the first forward);
  - for `resize` on dynamic-resolution models (Qwen) the pre-hook resamples each image's
    pixels to the grid whose token count fits the budget (qwen-vl-utils' `smart_resize`
    with `max_pixels` = budget x (patch x merge)^2), so the tower itself runs on fewer
    patches; the forward hook spreads the fewer tokens back over the original grid's slots
    (each at its bin's first token, as pooled tokens are), so the placeholder tokens still
    match, and the `pre` stage keeps just those slots, with the smaller grid's positions.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from itertools import count
from typing import Any

import torch
from torch import nn

from pruneware.adapters import Adapter
from pruneware.adapters.vision import resized_grid
from pruneware.engine.attention_capture import AttentionCapture, original_function
from pruneware.engine.plan_source import PlanSource
from pruneware.engine.request import RequestTracker
from pruneware.errors import PlanError
from pruneware.policies import policy_names

_ids = count()


@dataclass
class VisionRead:
    """One encoder call, per image in call order.

    Attributes:
        scores: the score layer's attention, float32: per image [n], or one tensor of the call's
            images in order ([n_images, n] or [sum of n]; see `Adapter.vision_image_scores`);
            None if not read.
        keys: the score layer's keys averaged over heads, float32, as `scores` with a last dim d.
        grids: the (h, w) token grid the tower actually produced per image (after `resize`),
            or None when it ran at the input's own resolution.
        n_images: images in the call.
    """

    scores: list[torch.Tensor] | torch.Tensor | None
    keys: list[torch.Tensor] | torch.Tensor | None
    grids: list[tuple[int, int]] | None
    n_images: int


class VisionAttentionCapture(AttentionCapture):
    """The vision tower's counterpart of `AttentionCapture`: it also passes the call's kwargs
    (the logit scale, and flash attention's packed sequence bounds)."""

    sub_config = "vision_config"

    def _attention(self, module: nn.Module, query, key, value, attention_mask, **kwargs):
        self.on_attention(module, query, key, kwargs)
        return original_function(self.original, module)(module, query, key, value, attention_mask, **kwargs)


def vision_needs(source: PlanSource, adapter: Adapter) -> tuple[bool, bool]:
    """What a plan's `pre` policy reads from the vision tower: (attention rows, resized pixels).
    Raises PlanError when the model cannot give it."""
    plan = source.plan_for(576, strict=False)
    if not plan.stages or plan.stages[0].where != "pre":
        return False, False
    needs = source.policy(plan, 0).needs.vision
    read = "attention" in needs or "keys" in needs
    resize = "resize" in needs and adapter.resizes_pixels
    if (read or resize) and adapter.vision_encoder() is None:
        raise PlanError(
            f"{plan.stages[0].policy!r} reads the vision tower, which {type(adapter).__name__} does not "
            f"expose: vision-side policies ({policy_names(lambda n: bool(n.vision))}) support LLaVA-1.5, Qwen2-VL "
            "and Qwen2.5-VL"
        )
    if read:
        adapter.vision_score_attention()  # raises for a tower it cannot read
    return read, resize


def refuse_counts_over_units(sample_plans: list, sizes: list[list[int]] | None) -> None:
    """Before any layer runs: a `resize` stage whose budget is a count, on a sample with several
    images or frames. The tower re-encodes each image at its budget's resolution before the
    engine knows which sample it belongs to, so only a ratio budget splits over several.

    sample_plans: per sample, its plan; sizes: per sample, the tokens of each image or frame."""
    for b, (plan, units) in enumerate(zip(sample_plans, sizes or [], strict=False)):
        stage = plan.stages[0] if plan.stages else None
        if stage is not None and isinstance(stage.budget, int) and len(units) > 1:
            raise PlanError(
                f"stage {stage}: sample {b} has {len(units)} images or frames, and a count budget cannot be split "
                "over them when each is re-encoded at its own resolution; give resize a ratio budget (e.g. "
                "resize@pre:0.25)"
            )


def resize_budget(source: PlanSource) -> Callable[[int], int | None]:
    """n_tokens -> the `pre` stage's budget for an image of n_tokens when that stage resizes."""

    def budget(n_tokens: int) -> int | None:
        plan = source.plan_for(n_tokens)
        stage = plan.stages[0] if plan.stages else None
        if stage is None:
            return None
        resizes = stage.where == "pre" and "resize" in source.policy(plan, 0).needs.vision
        return stage.keep_count(n_tokens) if resizes else None

    return budget


class VisionSide:
    """Hooks on one model's vision encoder; `install` returns the handles the session removes.

    resize_budget(n_tokens): the token budget of an image of n tokens when the plan's `pre`
    stage resizes, else None (the tower then runs at the input's resolution).
    """

    def __init__(
        self, model: nn.Module, adapter: Adapter, tracker: RequestTracker, read_attention: bool,
        resize_budget: Callable[[int], int | None] | None,
    ):
        self.model = model
        self.adapter = adapter
        self.tracker = tracker
        self.encoder = adapter.vision_encoder()
        if self.encoder is None:
            raise PlanError(f"{type(adapter).__name__} does not expose its vision encoder to pruneware")
        self.target = adapter.vision_score_attention() if read_attention else None
        self.resize_budget = resize_budget
        self._call: ContextVar[dict | None] = ContextVar(f"pruneware_vision_call_{next(_ids)}", default=None)
        self.capture: VisionAttentionCapture | None = None

    def install(self) -> list[Any]:
        handles = [
            self.encoder.register_forward_pre_hook(self._before, with_kwargs=True),
            self.encoder.register_forward_hook(self._after, with_kwargs=True, prepend=True, always_call=True),
        ]
        if self.target is not None:
            self.capture = VisionAttentionCapture(self.model, self._on_attention)
            self.capture.install()
        return handles

    def remove(self) -> None:
        if self.capture is not None:
            self.capture.remove()
            self.capture = None

    def _on_attention(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> None:
        call = self._call.get()
        if module is self.target and call is not None:
            if call.get("frames") is None and call["grid"] is not None:  # the frames' rows, from the host grid
                call["frames"] = [h * w for t, h, w in self.adapter.host_grid(call["grid"]) for _ in range(t)]
            kwargs = kwargs if call.get("frames") is None else {**kwargs, "frame_lengths": call["frames"]}
            call["parts"].append(self.adapter.vision_call_scores(query, key, kwargs.get("scaling"), kwargs))

    def _before(self, module: nn.Module, args: tuple, kwargs: dict):
        grid = self.adapter.vision_grid(args, kwargs)
        call: dict[str, Any] = {"parts": [], "grid": grid, "resized": None}
        self._call.set(call)
        if self.resize_budget is None or grid is None:
            return None
        targets, rows = [], self.adapter.host_grid(grid)  # the layout's read of the same tensor, when it had it
        for t, h, w in rows:
            hh, ww = self.adapter.token_grid(h, w)
            budget = self.resize_budget(t * hh * ww)
            factor = self.adapter.pixel_factor  # type: ignore[attr-defined]  # resizes_pixels: a Qwen adapter
            targets.append((hh, ww) if budget is None else resized_grid(hh, ww, max(1, budget // t), factor))
        if all(tuple(self.adapter.token_grid(h, w)) == g for (_, h, w), g in zip(rows, targets, strict=True)):
            return None
        if "grid_thw" not in kwargs:
            raise RuntimeError("resize needs the vision encoder's grid_thw passed by keyword")
        pixels, new_grid = self.adapter.resize_pixels(args[0], grid, targets)
        call.update(resized=targets, original=grid, new_grid=new_grid)
        return (pixels, *args[1:]), {**kwargs, "grid_thw": new_grid}

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        call = self._call.get()
        self._call.set(None)
        if call is None:
            return
        grid = call.get("new_grid", call["grid"])
        n_images = len(grid) if grid is not None else int(args[0].shape[0])
        scores = keys = None
        if call["parts"]:
            scores, keys = self.adapter.vision_image_scores(call["parts"], grid)
        grids = call["resized"]
        if grids is not None:
            original = call["original"]
            output.pooler_output = self.adapter.spread_tokens(output.pooler_output, original, grids)
            kwargs["grid_thw"] = original  # later hooks (the session's layout record) see the input's grid
        self.tracker.saw_vision_read(VisionRead(scores, keys, grids, n_images))


def reads_to_positions(
    reads: list[VisionRead], image_ids: torch.Tensor, grids: list[list[tuple[int, int]]], want_keys: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, list[list[tuple[int, int]]] | None]:
    """Lay the per-image reads of a request over its input positions.

    image_ids: [B, L] the layout's unit of each position (-1 for text); grids: the layout's
    per-sample unit grids. Images are taken in call order, which is the order their tokens
    appear in, sample after sample. Returns scores [B, L] (0 off the images), keys [B, L, d]
    and, per sample, each image's tower grid (None when nothing was resized).
    """
    units = [(b, u) for b, sample in enumerate(grids) for u in range(len(sample))]
    reads = list(reads)
    n_images = sum(r.n_images for r in reads)
    while reads and n_images > len(units):  # images encoded earlier in this context, for another call
        n_images -= reads.pop(0).n_images
    if n_images != len(units):
        raise ValueError(
            f"the vision tower encoded {n_images} images for this call but its input holds {len(units)}: "
            f"vision-side policies ({policy_names(lambda n: bool(n.vision))}) need the pixels encoded inside the "
            "pruneware session, one image per unit (images, not video)"
        )
    scores = _in_call_order([r.scores for r in reads if r.scores is not None], image_ids.device, keys=False)
    keys = None
    if want_keys:
        keys = _in_call_order([r.keys for r in reads if r.keys is not None], image_ids.device, keys=True)
    resized = [g for r in reads for g in (r.grids or [None] * r.n_images)]
    tokens = sum(h * w for sample in grids for h, w in sample)
    if scores is not None and scores.numel() != tokens:
        raise ValueError(f"the vision tower scored {scores.numel()} visual tokens but the input holds {tokens}")
    # Units are numbered by appearance, so the visual positions in row-major order run through
    # the images in call order: a masked scatter (row-major) lays the reads over them in order.
    visual = image_ids >= 0
    score_map = key_map = None
    if scores is not None:
        score_map = torch.zeros(image_ids.shape, dtype=torch.float32, device=image_ids.device)
        score_map.masked_scatter_(visual, scores)
    if keys is not None:
        key_map = torch.zeros(*image_ids.shape, keys.shape[-1], dtype=torch.float32, device=image_ids.device)
        key_map.masked_scatter_(visual[..., None], keys)
    out_grids: list[list[tuple[int, int]]] = [[] for _ in grids]
    for i, (b, u) in enumerate(units):
        out_grids[b].append(resized[i] if resized[i] is not None else grids[b][u])
    return score_map, key_map, out_grids if any(g is not None for g in resized) else None


def _in_call_order(
    parts: list[list[torch.Tensor] | torch.Tensor], device: torch.device, keys: bool,
) -> torch.Tensor | None:
    """The reads of several calls (per image [n] or [n, d] for keys, or one tensor per call, see
    `VisionRead`) as one tensor whose elements (rows of d for keys) run through the images in call
    order; None when there is none. One call read as one tensor costs no op."""
    pieces = [p for part in parts for p in ([part] if isinstance(part, torch.Tensor) else part)]
    if not pieces:
        return None
    if len(pieces) == 1:
        out = pieces[0]
    else:
        rank = 2 if keys else 1

        def flat(p: torch.Tensor) -> torch.Tensor:  # one call's [n_images, n(, d)] -> [n_images * n(, d)]
            return p if p.dim() == rank else p.reshape(-1, p.shape[-1]) if keys else p.reshape(-1)

        out = torch.cat([flat(p) for p in pieces])
    return out if out.device == device else out.to(device)
