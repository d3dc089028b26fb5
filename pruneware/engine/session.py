"""The engine: installs hooks for a session's lifetime, runs the stages, remaps at decode.

Hooks (all removed on exit, errors included):
  - a pre-hook on the multimodal base model reads `input_ids` and the image layout, and tells
    prefill (empty cache) from decode; a forward hook (always called) ends the call;
  - a pre-hook on the language model runs a `pre` stage on `inputs_embeds`, the 2-D mask and
    the positions, so every layer and the cache see the shorter sequence; at decode it
    remaps the 2-D mask through the kept index;
  - a pre-hook on every decoder layer >= the first in-LLM stage: at a stage's layer K it
    selects and slices the hidden states; at every layer of a pruned level it slices the
    cos/sin tables, position ids and mask rows/columns that the model loop passes full-size
    (once per level per forward, memoised), and at decode remaps the mask columns;
  - while a stage needs attention rows, a registered attention function (see attention_capture.py); a
    stage ranked by its own layer's attention previews that layer first (see attention_preview.py).
The session holds no run-time state: each call's lives in a `RequestState` (see request.py).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pruneware.adapters import Adapter, adapter_for
from pruneware.adapters.final_norm import final_norm
from pruneware.engine import masks
from pruneware.engine.arguments import SmallImages, check_session_arguments, stage_seed
from pruneware.engine.attention_capture import AttentionCapture
from pruneware.engine.attention_preview import PreviewDone, last_row_preview, run_preview
from pruneware.engine.kv_caches import cache_of, output_cache, static_length, unwrap_mask
from pruneware.engine.layer_inputs import memoised_level_kwargs
from pruneware.engine.levels import Level
from pruneware.engine.plan_source import NOMINAL_VISUAL_TOKENS, PlanSource
from pruneware.engine.pre_llm import decode_inputs, prefill_inputs
from pruneware.engine.request import PrefillState, RequestState, RequestTracker
from pruneware.engine.stage_inputs import captured_scores, captures_at, previews, stage_context
from pruneware.engine.stage_runner import Selection, enter_level, run_stage
from pruneware.engine.vision_tower_reads import VisionSide, refuse_counts_over_units, resize_budget, vision_needs
from pruneware.engine.vit_stages import VisionStages, check_vision_stages
from pruneware.errors import NonFiniteError, PlanError
from pruneware.policies import Policy, build_policy
from pruneware.plans.plan import Plan, Stage
from pruneware.report import Report, finish_report


_ACTIVE: weakref.WeakKeyDictionary[nn.Module, Session] = weakref.WeakKeyDictionary()


def attached_session(model: nn.Module) -> Session | None:
    """The session installed on `model` (by `prune` or `attach`), or None."""
    return _ACTIVE.get(model)


class Session:
    """A pruning run on one model. Use as a context manager, or `attach()` / `detach()`.

    `report` is the last call completed on the current thread; `on_report(report)` is called
    with every call's report as it completes (on the thread that ran it).
    """

    def __init__(
        self, model: nn.Module, plan: str | Plan, *, seed: int = 0, avg_tokens: float | None = None,
        on_report: Callable[[Report], Any] | None = None, small_images: SmallImages = "error",
    ):
        seed, avg_tokens, small_images = check_session_arguments(seed, avg_tokens, on_report, small_images)
        self.model = model
        self.adapter: Adapter = adapter_for(model)
        self.source = PlanSource.create(plan, self.adapter, avg_tokens, small_images)
        self.seed = seed
        self.on_report = on_report
        self._handles: list[Any] = []
        self._capture: AttentionCapture | None = None
        self._vision: VisionSide | None = None
        self._requests = RequestTracker()
        self._text_config = self.adapter.text_config  # read per forward; a config's attribute access is slow
        self._n_layers = self.adapter.n_layers
        self._attn = self._text_config._attn_implementation or "eager"
        self._vision_reads = vision_needs(self.source, self.adapter)  # raises before any hook
        plan = self.source.plan_for(NOMINAL_VISUAL_TOKENS, strict=False)
        self._vit: VisionStages | None = None
        self._vit_policies = [build_policy(s) for s in plan.vision]
        if plan.vision:
            check_vision_stages(plan.vision, self._vit_policies, self.adapter)  # raises before any hook
            if any(self._vision_reads):
                raise PlanError(f"plan {plan}: a 'pre' policy that reads the vision tower cannot follow a vision-side stage")
        self._records_lm_input = any(self.source.policy(plan, i).needs.raters for i in range(len(plan.stages)))

    @property
    def report(self) -> Report:
        """The report of the last call completed on this thread (empty before the first)."""
        return self._requests.last_report or Report(n_layers=self.adapter.n_layers)

    # lifecycle -------------------------------------------------------------------------
    def attach(self) -> Session:
        if self.model in _ACTIVE:
            raise RuntimeError("this model already has a pruneware session; detach it first")
        try:
            base = self.adapter.base_model
            self._handles.append(base.register_forward_pre_hook(self._on_base, with_kwargs=True))
            self._handles.append(base.register_forward_hook(self._on_base_done, always_call=True))
            lm = self.adapter.language_model
            self._handles.append(lm.register_forward_pre_hook(self._on_language_model, with_kwargs=True))
            self._handles.append(lm.register_forward_hook(self._on_language_model_done))
            tower = self.adapter.vision_tower()
            if tower is not None:
                self._handles.append(tower.register_forward_hook(self._on_vision, with_kwargs=True))
            for i in range(self.adapter.injection_layers()):
                self._handles.append(self.adapter.layers[i].register_forward_hook(self._inject_hook(i)))
            first = self.source.first_llm_layer()
            if first is not None:
                for i in range(first, self.adapter.n_layers):
                    hook = self.adapter.layers[i].register_forward_pre_hook(self._layer_hook(i), with_kwargs=True)
                    self._handles.append(hook)
            if self.source.needs_attention():
                self._capture = AttentionCapture(self.model, self._on_attention)
                self._capture.install()
            self._install_vision()
            encoder = self.adapter.vision_encoder()
            if encoder is not None:  # registered last: it sees the input a `resize` pre-hook rewrote
                self._handles.append(encoder.register_forward_pre_hook(self._on_encoder_input, with_kwargs=True))
        except BaseException:
            self._remove()
            raise
        _ACTIVE[self.model] = self
        return self

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        if self._vision is not None:
            self._vision.remove()
            self._vision = None
        if self._vit is not None:
            self._vit.remove()
            self._vit = None
        self._requests.clear()

    def detach(self) -> None:
        self._remove()
        if _ACTIVE.get(self.model) is self:
            del _ACTIVE[self.model]

    def __enter__(self) -> Session:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def _install_vision(self) -> None:
        """Hooks on the vision tower when the `pre` policy reads it (see vision_tower_reads.py)."""
        vision = self.source.plan_for(NOMINAL_VISUAL_TOKENS, strict=False).vision
        if vision:  # a vision-side stage (see vit_stages.py)
            self._vit = VisionStages(self.model, self.adapter, vision, self._vit_policies, self.seed * 1_000_003 - 1)
            self._handles.extend(self._vit.install())
        read, resize = self._vision_reads
        if read or resize:
            budget = resize_budget(self.source) if resize else None
            self._vision = VisionSide(self.model, self.adapter, self._requests, read, budget)
            self._handles.extend(self._vision.install())

    # hooks -----------------------------------------------------------------------------
    def _on_vision(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        self._requests.saw_vision(output, self.adapter.vision_grid(args, kwargs))

    def _on_encoder_input(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self._vit is None:  # a vision-side stage records what its cut tower ran
            self._requests.saw_tower_input(self.adapter.tower_call_flops(args, kwargs))

    def _on_base(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._requests.enter()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = cache_of(kwargs)
        past = int(cache.get_seq_length()) if cache is not None else 0
        if past:
            state = self._requests.resume(cache)
            if state is None:
                raise RuntimeError("this cache was filled outside the pruneware session; start generation inside it")
            state.fold_layer0()  # a stage at layer 0 left the cache its level
            state.decode.active, state.decode.past0 = True, past
            for level in state.levels:
                level.cache.clear()
            return
        if input_ids is None:
            raise ValueError("pruneware locates visual tokens from input_ids: pass input_ids, not inputs_embeds")
        static_len = static_length(cache)  # refuses a cache the engine cannot drive
        self._requests.replay_encoding(kwargs.get("mm_encoder_outputs"))  # generate(use_cache=False)
        layout = self.adapter.layout(input_ids, {**kwargs, "seen_vision": self._requests.take_vision()})
        n_visual = layout.counts
        sample_plans = self.source.sample_plans(n_visual)  # raises before any layer runs
        if self._vision_reads[1]:  # the tower resizes each image to its budget
            refuse_counts_over_units(sample_plans, layout.sizes)
        plan = next((p for p, n in zip(sample_plans, n_visual, strict=True) if n), sample_plans[0])
        report = Report(n_layers=self._n_layers, plan=str(plan), sample_plans=[str(p) for p in sample_plans],
                        below_budget=self.source.below_budget(n_visual))
        prefill = PrefillState(
            layout, sample_plans, n_visual, report, position_inputs=self.adapter.position_inputs(input_ids, kwargs),
        )
        state = RequestState(plan, prefill, static_len=static_len)
        self._requests.start(state, cache)

    def _on_base_done(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._requests.exit()

    def _on_language_model(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        state = self._requests.current
        if state is None:
            return None
        embeds = kwargs["inputs_embeds"]
        positions = kwargs.get("position_ids")
        mask = kwargs["attention_mask"] = unwrap_mask(kwargs.get("attention_mask"))
        if state.decode.active:
            return args, decode_inputs(state, kwargs, embeds, positions, mask, masks.mask_kind(self._attn))
        kind = masks.mask_kind(self._attn)
        return args, prefill_inputs(
            state, self.adapter, kwargs, embeds, positions, mask, kind, self._records_lm_input,
            lambda pre, level, hidden: self._run(state, 0, pre, level, hidden),
            None if self._vit is None else self._vit.language_model_keep,
        )

    def _on_language_model_done(self, module: nn.Module, args: tuple, output: Any) -> None:
        state = self._requests.current
        if state is None or state.decode.active:
            return
        prefill = state.prefill
        prefill.release()
        prefill.report.vision_flops = self._requests.take_tower_flops() + (self._vit.take_flops() if self._vit else [])
        self._requests.bind(output_cache(output), state)  # a cache the model made itself
        per_layer = [state.level_for(i)[0] for i in range(self._n_layers)]
        finite = finish_report(
            prefill.report, prefill.input_real, [lvl.n_slots for lvl in state.levels],
            [lvl.n_visual for lvl in state.levels], per_layer, state.decode.input_length, self._text_config,
            [flag for _, flag in prefill.finite],
        )
        for (stage, _), ok in zip(prefill.finite, finite, strict=True):
            if not all(ok):
                samples = [b for b, fine in enumerate(ok) if not fine]
                raise NonFiniteError(
                    f"stage {stage}: the states that policy {stage.policy!r} scored hold NaN or infinite values "
                    f"(samples {samples}), so its choice would be arbitrary; check the inputs (e.g. pixel_values)"
                )
        self._requests.completed(prefill.report)
        if self.on_report is not None:
            self.on_report(prefill.report)

    def _layer_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
            state = self._requests.current
            if state is None:
                return None
            if not state.decode.active:
                stage_index = self.source.stage_index_at(state.plan, layer)
                if stage_index is not None:
                    args = self._run_llm_stage(state, stage_index, layer, args, kwargs)
            level = state.level_for(layer)[1]
            if level.identity:
                return args, kwargs
            kwargs.update(self._sliced_kwargs(state, level, layer, kwargs))
            return args, kwargs

        return hook

    def _run_llm_stage(self, state: RequestState, stage_index: int, layer: int, args: tuple, kwargs) -> tuple:
        stage = state.plan.stages[stage_index]
        hidden = args[0] if args else kwargs["hidden_states"]
        parent = state.levels[-1]
        policy = self.source.policy(state.plan, stage_index)
        if previews(policy.needs):
            self._preview_attention(state, layer, parent, hidden, kwargs, policy)
        selection = self._run(state, stage_index, stage, parent, hidden)
        return enter_level(state, stage, layer, selection, policy.needs.recycles, hidden, args, kwargs)

    def _preview_attention(
        self, state: RequestState, layer: int, parent: Level, hidden: torch.Tensor, kwargs, policy: Policy,
    ) -> None:
        """Score layer `layer`'s own attention rows on its unpruned input (see attention_preview.py)."""
        if not parent.identity:
            kwargs = {**kwargs, **self._sliced_kwargs(state, parent, layer, kwargs)}
        fused = last_row_preview(state, policy, parent, self.adapter.layers[layer], hidden, kwargs)
        if fused is not None:  # one kernel call, no module run and no capture
            state.prefill.captured[layer] = fused
            return
        state.prefill.preview = layer
        try:
            run_preview(self.adapter.layers[layer], hidden, kwargs)
        finally:
            state.prefill.preview = None

    def _sliced_kwargs(self, state: RequestState, level: Level, layer: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        return memoised_level_kwargs(state, level, self.adapter.layer_group(layer), kwargs, self.adapter.rope_tables,
                                     masks.mask_kind(self._attn))

    def _inject_hook(self, layer: int):
        """After an early layer: add the model's per-layer visual features to the kept tokens."""

        def hook(module: nn.Module, args: tuple, output: Any):
            state = self._requests.current
            if state is None or state.decode.active or state.prefill.injections is None:
                return None
            level = state.level_for(layer)[1]
            if isinstance(output, tuple):
                return (state.prefill.injections.add(output[0], layer, level.orig, level.valid), *output[1:])
            return state.prefill.injections.add(output, layer, level.orig, level.valid)

        return hook

    def _on_attention(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, mask: Any) -> None:
        """Score visual tokens for the stage at layer_idx + 1 (or at layer_idx, in a preview).

        query: [B, H, Ls, d]; key: [B, Hkv, Ls, d].
        """
        state = self._requests.current
        if state is None or state.decode.active:
            return
        preview = state.prefill.preview == module.layer_idx
        target = module.layer_idx if preview else module.layer_idx + 1
        stage_index = self.source.stage_index_at(state.plan, target)
        if stage_index is None:
            return
        policy = self.source.policy(state.plan, stage_index)
        if not captures_at(policy.needs, preview):
            return
        _, level = state.level_for(module.layer_idx)
        state.prefill.captured[target] = captured_scores(
            state, policy, level, query, key, getattr(module, "scaling", None), self.adapter.rope_tables
        )
        if preview:
            raise PreviewDone

    # selection ---------------------------------------------------------------------------
    def _run(self, state: RequestState, stage_index: int, stage: Stage, level: Level, hidden: torch.Tensor) -> Selection:
        policy = self.source.policy(state.plan, stage_index)
        reads = self._requests.take_vision_reads() if stage.where == "pre" and self._vision is not None else None
        ctx = stage_context(
            state, stage_index, policy, level, hidden, stage_seed(self.seed, stage_index), reads,
            lambda states: final_norm(self.adapter.language_model.norm, states),
        )
        selection = run_stage(ctx)
        state.prefill.report.stages.append(selection.report)
        if selection.finite is not None:
            state.prefill.finite.append((stage, selection.finite))
        return selection
