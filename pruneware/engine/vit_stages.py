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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pruneware.adapters import Adapter
from pruneware.engine.request import _ContextSlot  # same package: the tracker's leak-free slots
from pruneware.engine.vision_tower_reads import VisionAttentionCapture
from pruneware.errors import PlanError
from pruneware.plans.plan import Stage
from pruneware.policies import Policy, StageInput, policy_names



@dataclass
class KeptUnits:
    """One encoder call: per image (call order), [t * hh * ww] bool, row-major, frame after frame."""

    keep: list[torch.Tensor]


def check_vision_stages(stages: tuple[Stage, ...], policies: list[Policy], adapter: Adapter) -> None:
    """Raise PlanError for vision-side stages this model or these policies cannot run."""
    cut = adapter.vision_cut()
    depth = cut.depth if cut is not None else None
    for stage, policy in zip(stages, policies, strict=True):
        if depth is None:
            raise PlanError(
                f"stage {stage}: {type(adapter).__name__} does not support vision-side stages (pre-vit, vitK); "
                "they run on LLaVA-1.5, Qwen2-VL, Qwen2.5-VL and Qwen3-VL"
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
    if len(stages) > 1:
        raise PlanError(f"one vision-side stage per plan, got {', '.join(str(s) for s in stages)}")


def score_block(cut: Any, stage: Stage) -> int | None:
    """The block whose attention a vision-attention policy reads at `stage`: the last full-attention one before K."""
    if stage.where == "pre-vit":
        return None
    before = [b for b in cut.full_blocks if b < stage.vit_block]
    return max(before) if before else None


class VisionStages:
    """The hooks of one session's vision-side stage (see the module docstring)."""

    def __init__(self, model: nn.Module, adapter: Adapter, stage: Stage, policy: Policy, seed: int):
        self.model, self.adapter, self.stage, self.policy, self.seed = model, adapter, stage, policy, seed
        self.cut = adapter.vision_cut()
        self.block = int(stage.vit_block)  # type: ignore[arg-type]
        self.encoder = adapter.vision_encoder()
        # context-local (threads, tasks), in the tracker's shared slots so that no session leaves a
        # ContextVar behind; each is emptied once read
        self._call = _ContextSlot(None)  # dict | None: the encoder call in flight
        self._kept = _ContextSlot(())  # KeptUnits per finished call, until the prefill takes them
        self._flops = _ContextSlot(())  # per image, what the calls ran
        self._types = _ContextSlot(None)  # [B, L] token types of the prefill that follows encoder calls
        self.capture: VisionAttentionCapture | None = None
        block = score_block(self.cut, stage) if "attention" in policy.needs.vision else None
        self.target = None if block is None else self.cut.attention(block)
        self._last = _ContextSlot(None)  # the last finished call's cut (a projector after the tower)

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
        if self.target is not None:
            self.capture = VisionAttentionCapture(self.model, self._on_attention)
            self.capture.install()
        return handles

    def remove(self) -> None:
        if self.capture is not None:
            self.capture.remove()
            self.capture = None

    # hooks ---------------------------------------------------------------------------------
    def _on_base(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is not None:
            self._types.set(self.adapter.token_types(input_ids))

    def _base_done(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._types.set(None)

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        grid = self.cut.call_grid(args, kwargs)
        pixels = args[0] if args else next(v for k, v in kwargs.items() if k in ("hidden_states", "pixel_values"))
        call: dict[str, Any] = {"grid": grid, "cut": None, "parts": []}
        if self.stage.where == "pre-vit":
            call["features"] = self.cut.pixel_features(pixels)
        self._call.set(call)

    def _on_attention(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> None:
        call = self._call.get()
        if module is self.target and call is not None and call["cut"] is None:
            call["parts"].append(self.adapter.vision_call_scores(query, key, kwargs.get("scaling"), kwargs))

    def _block_hook(self, block: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            call = self._call.get()
            if call is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if block == self.block:
                call["cut"] = self.cut.cut(call["grid"], self._select(call, hidden))
                hidden = self.cut.cut_hidden(call["cut"], hidden)
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
        grid, cut = call["grid"], call["cut"]
        self._last.set(cut)
        sizes = [t * hh * ww for t, hh, ww in self.cut.units(grid)]
        self._kept.set((*self._kept.get(), KeptUnits(list(cut.keep.split(sizes)))))
        self._flops.set((*self._flops.get(), *self.cut.call_flops(grid, self.block, cut)))

    # selection -------------------------------------------------------------------------------
    def _select(self, call: dict, hidden: torch.Tensor) -> torch.Tensor:
        """[n_units] bool, row-major: the units the stage keeps in this call."""
        grid = call["grid"]
        feats = call.get("features")
        feats = self.cut.unit_features(hidden, grid) if feats is None else feats
        scores = None
        if call["parts"]:
            scores = torch.cat(self.adapter.vision_image_scores(call["parts"], grid)[0])
        inputs, counts = unit_input(self.stage, feats, scores, self.cut.units(grid), self.seed)
        with torch.no_grad():
            picked = self.policy.select(inputs, counts)
        keep = torch.zeros(feats.shape[0], dtype=torch.bool, device=feats.device)
        start = 0
        for (t, hh, ww), rows in zip(self.cut.units(grid), picked, strict=True):
            keep[start + rows.to(keep.device)] = True
            start += t * hh * ww
        return keep

    # what the language-model side reads --------------------------------------------------------
    def take_flops(self) -> list[float]:
        flops = list(self._flops.get())
        self._flops.set(())
        return flops

    def language_model_keep(self, visual: torch.Tensor) -> list[torch.Tensor]:
        """Per sample, the indices (into its visual slots, in slot order) of the kept visual
        tokens. visual: [B, L] bool. Calls are laid over the visual positions modality by modality
        (the Qwen models encode every image, then every video), each in reading order."""
        records = list(self._kept.get())
        self._kept.set(())
        self._last.set(None)
        types = self._types.get()
        self._types.set(None)
        keep = [k for r in records for k in r.keep]
        n_visual = int(visual.sum())
        while keep and sum(k.numel() for k in keep) > n_visual:  # calls encoded earlier in this context
            keep = keep[len(records.pop(0).keep):]
        if n_visual == 0 and not keep:
            return [visual.new_zeros(0, dtype=torch.long) for _ in range(visual.shape[0])]
        if types is None or sum(k.numel() for k in keep) != n_visual:
            raise ValueError(
                f"the vision tower cut {sum(k.numel() for k in keep)} visual tokens' units but the input holds "
                f"{n_visual}: vision-side stages need the pixels encoded inside the pruneware session"
            )
        flat = torch.cat(keep).to(visual.device) if keep else visual.new_zeros(0)
        kept_map = torch.zeros_like(visual)
        start = 0
        for kind in sorted(set(types[visual].tolist())):
            slots = visual & (types.to(visual.device) == kind)
            n = int(slots.sum())
            kept_map[slots] = flat[start : start + n]
            start += n
        return [kept_map[b][visual[b]].nonzero().squeeze(1) for b in range(visual.shape[0])]


def unit_input(
    stage: Stage, feats: torch.Tensor, scores: torch.Tensor | None, units: list[tuple[int, int, int]], seed: int,
) -> tuple[StageInput, list[int]]:
    """The policy's batch for one encoder call: row b is image b, its frames are its images.

    feats: [n_units, D] row-major over the call; scores: [n_units] or None. Returns the input and
    each row's budget (from its own unit count).
    """
    sizes = [t * hh * ww for t, hh, ww in units]
    n, batch, device = max(sizes), len(sizes), feats.device
    hidden = feats.new_zeros(batch, n, feats.shape[-1])
    valid = torch.zeros(batch, n, dtype=torch.bool, device=device)
    image_ids = torch.full((batch, n), -1, dtype=torch.long, device=device)
    vision_scores = None if scores is None else torch.zeros(batch, n, dtype=torch.float32, device=device)
    start = 0
    for b, (t, hh, ww) in enumerate(units):
        m = t * hh * ww
        hidden[b, :m] = feats[start : start + m]
        valid[b, :m] = True
        image_ids[b, :m] = torch.arange(t, device=device).repeat_interleave(hh * ww)
        if vision_scores is not None:
            vision_scores[b, :m] = scores[start : start + m].float()
        start += m
    inputs = StageInput(
        hidden=hidden, valid=valid, image_ids=image_ids, attention=None, seed=seed, layer=0,
        grids=[[(hh, ww)] * t for t, hh, ww in units], vision_scores=vision_scores,
        sizes=[[hh * ww] * t for t, hh, ww in units],
    )
    return inputs, [stage.keep_count(m) for m in sizes]
