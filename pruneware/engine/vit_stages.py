"""Vision-side stages: `vitK` (before vision-tower block K) and `pre-vit` (on the raw patches).

Installed by a Session for its lifetime when its plan has a vision-side stage (and removed
with it). Hooks, per encoder call:
  - a pre-hook on the encoder notes the call's grid (and, for `pre-vit`, each unit's raw
    patches, which the policy reads instead of hidden states);
  - a pre-hook on block K runs the stage's policy on the call's units (each image or video is
    a row of the policy's batch, its frames its images; the budget applies per image, from its
    own unit count) and cuts the tower (`Adapter.vision_cut().cut`); it and every later block's
    pre-hook swap the loop's full-size kwargs for the kept rows' (`block_kwargs`);
  - a forward hook on the merger spreads the kept tokens back over every unit's slot (zeros
    elsewhere), so the tower's output still fills the language model's placeholders;
  - a forward hook on the encoder records the kept units (for the language-model side) and the
    FLOPs the call actually ran;
  - for a policy that reads the tower's attention (`Needs(vision=("attention",))`), the
    attention capture reads q and k at the last full-attention block before K (mean attention
    received, as the `pre` stage reads it).
At the language model's input (`pruneware.engine.pre_llm`), `language_model_keep` turns the
recorded units into the kept visual positions, which enter as a `pre` stage's would.
`pre-vit` cuts before block 0: the patch embedding (one linear map per patch) still runs on
every patch, and is counted so.
A plan may hold several vision-side stages (`pre-vit`, then `vitK` in increasing K): each cuts
in turn, choosing among the units the earlier ones kept (the others reach its policy as
invalid rows, with their image's budget taken from its own unit count, capped by what is left),
and the report holds one entry per stage. A later stage that reads the tower's attention reads
it over the rows then alive.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pruneware.adapters import Adapter
from pruneware.engine.request import _ContextSlot  # same package: the tracker's leak-free slots
from pruneware.engine.vision_tower_reads import VisionAttentionCapture
from pruneware.errors import PlanError
from pruneware.plans.plan import Stage
from pruneware.policies import Policy, policy_names
from pruneware.engine.vit_units import ShapeCache, keep_mask, picked_rows, uniform_language_keep, unit_input

__all__ = ["KeptUnits", "VisionStages", "check_vision_stages", "score_block", "unit_input"]



@dataclass
class KeptUnits:
    """One encoder call. cuts: per vision-side stage, its cut (`.keep`: [n_units] bool, row-major
    over the call's images in call order, frame after frame, built when read); rows: per stage,
    [n_images, k] the kept unit indices per image when every image kept k (else None); units:
    per image (t, h, w), host-side."""

    cuts: list[Any]
    rows: list[torch.Tensor | None]
    units: list[tuple[int, int, int]]


def check_vision_stages(stages: tuple[Stage, ...], policies: list[Policy], adapter: Adapter) -> None:
    """Raise PlanError for vision-side stages this model or these policies cannot run."""
    cut = adapter.vision_cut()
    depth = cut.depth if cut is not None else None
    for stage, policy in zip(stages, policies, strict=True):
        if depth is None:
            raise PlanError(
                f"stage {stage}: {type(adapter).__name__} does not support vision-side stages (pre-vit, vitK); "
                "they run on LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL and Qwen3-VL"
            )
        if not 0 <= stage.vit_block < depth:  # type: ignore[operator]
            raise PlanError(
                f"stage {stage} prunes before vision block {stage.vit_block}, but the vision tower has {depth} "
                f"blocks: use vit0..vit{depth - 1}, or 'pre-vit'"
            )
        if stage.budget == 0:
            raise PlanError(f"stage {stage}: a vision-side stage keeps at least one unit per image; give a budget >= 1")
        if not policy.needs.vit:
            raise PlanError(f"stage {stage}: {stage.policy!r} cannot run in the vision tower; policies that can: "
                            f"{policy_names(lambda n: n.vit)}")
        if "attention" in policy.needs.vision and score_block(cut, stage) is None:
            raise PlanError(
                f"stage {stage}: {stage.policy!r} reads the attention of a full-attention vision block before "
                f"block {stage.vit_block}; this tower's are {sorted(cut.full_blocks)}: put the stage after one"
            )


def score_block(cut: Any, stage: Stage) -> int | None:
    """The block whose attention a vision-attention policy reads at `stage`: the last full-attention one before K."""
    if stage.where == "pre-vit":
        return None
    before = [b for b in cut.full_blocks if b < stage.vit_block]
    return max(before) if before else None


class VisionStages:
    """The hooks of one session's vision-side stages (see the module docstring); stages in plan
    order, each with its policy. Stage i draws with seed - i * 1_000_003 (the first: `seed`)."""

    def __init__(self, model: nn.Module, adapter: Adapter, stages: Sequence[Stage], policies: Sequence[Policy],
                 seed: int):
        self.model, self.adapter, self.seed = model, adapter, seed
        self.stages, self.policies = tuple(stages), tuple(policies)
        self.cut = adapter.vision_cut()
        self.blocks = [int(s.vit_block) for s in self.stages]  # type: ignore[arg-type]
        self.block = self.blocks[0]
        self.encoder = adapter.vision_encoder()
        # context-local (threads, tasks), in the tracker's shared slots so that no session leaves a
        # ContextVar behind; each is emptied once read
        self._call = _ContextSlot(None)  # dict | None: the encoder call in flight
        self._kept = _ContextSlot(())  # KeptUnits per finished call, until the prefill takes them
        self._flops = _ContextSlot(())  # per image, what the calls ran
        self._types = _ContextSlot(None)  # [B, L] input_ids of the prefill that follows encoder calls (their types)
        self.capture: VisionAttentionCapture | None = None
        scored = [score_block(self.cut, s) if "attention" in p.needs.vision else None
                  for s, p in zip(self.stages, self.policies, strict=True)]
        self.targets = [None if b is None else self.cut.attention(b) for b in scored]  # per stage
        self._last = _ContextSlot(None)  # the last finished call's cut (a projector after the tower)
        self._shapes = ShapeCache()  # masks and offsets that depend only on the call's sizes
        self._modalities = len(adapter.visual_token_ids())  # one: calls map onto the slots in reading order
        # a cut may read the tower's attention itself, without the keys the `pre` stage's reads carry
        self._call_scores = getattr(self.cut, "attention_scores", adapter.vision_call_scores)
        self._image_scores = getattr(self.cut, "call_scores", None)
        self._per_image = {"per_image": True} if getattr(self.cut, "per_image_features", False) else {}
        self._frames = getattr(self.cut, "frames", None)  # a cut whose images hold frames of different sizes

    def install(self) -> list[Any]:
        handles = [
            self.encoder.register_forward_pre_hook(self._before, with_kwargs=True),
            self.encoder.register_forward_hook(self._after, with_kwargs=True, always_call=True),
            self.adapter.base_model.register_forward_pre_hook(self._on_base, with_kwargs=True),
            self.adapter.base_model.register_forward_hook(self._base_done, always_call=True),
            *self.cut.install_outputs(self._current_cut),
        ]
        for b in range(self.block, self.cut.depth):
            handles.append(self.cut.blocks[b].register_forward_pre_hook(self._block_hook(b), with_kwargs=True))
        if any(t is not None for t in self.targets):
            self.capture = VisionAttentionCapture(self.model, self._on_attention)
            self.capture.install()
        return handles

    def remove(self) -> None:
        """Uninstall, and empty this context's slots: a forward that failed inside the tower (a
        refused stage, an error in a block) leaves its call, records and cut behind otherwise."""
        if self.capture is not None:
            self.capture.remove()
            self.capture = None
        for slot, empty in ((self._call, None), (self._kept, ()), (self._flops, ()), (self._types, None),
                            (self._last, None)):
            slot.set(empty)

    # hooks ---------------------------------------------------------------------------------
    def _on_base(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is not None and self._modalities > 1:  # typed only if several calls must be told apart
            self._types.set(input_ids)

    def _base_done(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._types.set(None)

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        grid = self.cut.call_grid(args, kwargs)
        pixels = args[0] if args else next(v for k, v in kwargs.items() if k in ("hidden_states", "pixel_values"))
        # cut: the cut in force; cuts: (block, cut) as they ran; parts: per stage, its attention reads
        # and the cut in force when they were read
        call: dict[str, Any] = {"grid": grid, "units": self.cut.call_units(grid, args, kwargs), "cut": None,
                                "cuts": [], "rows": [], "parts": [[] for _ in self.stages],
                                "read_under": [None] * len(self.stages)}
        if self.stages[0].where == "pre-vit":
            call["features"] = self.cut.pixel_features(pixels, **self._per_image)
        self._call.set(call)

    def _on_attention(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> None:
        call = self._call.get()
        if call is None:
            return
        for i, target in enumerate(self.targets):
            if module is target and len(call["cuts"]) <= i:  # stage i has not chosen yet
                call["parts"][i].append(self._call_scores(query, key, kwargs.get("scaling"), kwargs))
                call["read_under"][i] = call["cut"]

    def _block_hook(self, block: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            call = self._call.get()
            if call is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            for i in (i for i, k in enumerate(self.blocks) if k == block):  # plan order: pre-vit before vit0
                cut = self._select(call, hidden, i)
                hidden = self.cut.cut_hidden(cut, hidden)
                call["cut"] = cut
                call["cuts"].append((block, cut))
            kwargs.update(self.cut.block_kwargs(call["cut"], block, kwargs))
            if args:
                return (hidden, *args[1:]), kwargs
            kwargs["hidden_states"] = hidden
            return args, kwargs

        return hook

    def _current_cut(self) -> Any:
        """The cut of the encoder call in flight, or else of the last one (a projector outside the tower)."""
        call = self._call.get()
        return call["cut"] if call is not None else self._last.get()

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        call = self._call.get()
        self._call.set(None)
        if call is None or call["cut"] is None:
            return
        grid = call["grid"]
        self._last.set(call["cut"])
        record = KeptUnits([c for _, c in call["cuts"]], call["rows"], call["units"])
        self._kept.set((*self._kept.get(), record))
        self._flops.set((*self._flops.get(), *self.cut.call_flops(grid, call["cuts"])))

    # selection -------------------------------------------------------------------------------
    def _select(self, call: dict, hidden: torch.Tensor, i: int) -> Any:
        """The cut of stage i in this call: the units its policy keeps (a subset of the cut in force)."""
        grid, units, before = call["grid"], call["units"], call["cut"]
        feats = call.get("features") if self.stages[i].where == "pre-vit" else None
        feats = self.cut.unit_features(hidden, grid, before, **self._per_image) if feats is None else feats
        scores = None
        if call["parts"][i]:
            parts = self.cut.full_parts(call["read_under"][i], call["parts"][i])
            if self._image_scores is not None:  # the cut's own read: scores only
                scores = self._image_scores(parts, grid)
            else:
                per_image = self.adapter.vision_image_scores(parts, grid)[0]  # per image, or one tensor in order
                if isinstance(per_image, torch.Tensor):
                    scores = per_image if per_image.dim() == 1 else per_image.reshape(-1)
                else:
                    scores = per_image[0] if len(per_image) == 1 else torch.cat(per_image)
        alive = None if before is None else before.keep
        inputs, counts = unit_input(self.stages[i], feats, scores, units, self.seed - i * 1_000_003, alive,
                                    self._shapes, None if self._frames is None else self._frames(grid))
        with torch.no_grad():
            picked = self.policies[i].select(inputs, counts)
        rows = picked_rows(picked, feats.device) if len(set(units)) == 1 else None
        call["rows"].append(rows)
        if rows is not None:  # every image keeps k: one batched cut, no mask to rebuild
            return self.cut.cut_rows(grid, units, rows, parent=before)
        return self.cut.cut(grid, keep_mask(picked, units, feats.device), parent=before)

    # what the language-model side reads --------------------------------------------------------
    def take_flops(self) -> list[float]:
        flops = list(self._flops.get())
        self._flops.set(())
        return flops

    def language_model_keep(self, visual: torch.Tensor, n_visual: list[int] | None = None) -> list[list[torch.Tensor]]:
        """Per vision-side stage, per sample, the indices (into its visual slots, in slot order) of
        the visual tokens it kept (a list, or a [B, k] tensor when every sample keeps k). visual:
        [B, L] bool; n_visual: its visual slots per sample, when known on the host (then, when one
        modality or one encoder call fills the slots and the samples hold alike images, no sync). Calls are laid over
        the visual positions modality by modality (the Qwen models encode every image, then every
        video), each in reading order."""
        records = list(self._kept.get())
        self._kept.set(())
        self._last.set(None)
        types = self._types.get()
        self._types.set(None)
        total = int(visual.sum()) if n_visual is None else sum(n_visual)
        units_of = [sum(t * hh * ww for t, hh, ww in r.units) for r in records]
        while records and sum(units_of) > total:  # calls encoded earlier in this context
            records.pop(0)
            units_of.pop(0)
        if total == 0 and not records:
            return [[visual.new_zeros(0, dtype=torch.long) for _ in range(visual.shape[0])] for _ in self.stages]
        if (types is None and self._modalities > 1) or sum(units_of) != total:
            raise ValueError(
                f"the vision tower cut {sum(units_of)} visual tokens' units but the input "
                f"holds {total}: vision-side stages need the pixels encoded inside the pruneware session"
            )
        one_kind = self._modalities == 1 or len(records) == 1  # one call: the slots in reading order are its units
        if one_kind and n_visual is not None and all(r is not None for c in records for r in c.rows):
            units = [u for c in records for u in c.units]
            kept = [uniform_language_keep([c.rows[i] for c in records], units, n_visual, self._shapes)
                    for i in range(len(self.stages))]
            if all(k is not None for k in kept):
                return kept  # type: ignore[return-value]
        types = None if types is None or one_kind else self.adapter.token_types(types)
        kinds = sorted(set(types[visual].tolist())) if types is not None else [None]
        out = []
        for i in range(len(self.stages)):
            keep = [c.cuts[i].keep for c in records]
            flat = torch.cat(keep).to(visual.device) if keep else visual.new_zeros(0)
            kept_map = torch.zeros_like(visual)
            start = 0
            for kind in kinds:
                slots = visual if kind is None else visual & (types.to(visual.device) == kind)
                n = int(slots.sum())
                kept_map[slots] = flat[start : start + n]
                start += n
            out.append([kept_map[b][visual[b]].nonzero().squeeze(1) for b in range(visual.shape[0])])
        return out
