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
from pruneware.engine import masks
from pruneware.engine.attention_capture import AttentionCapture
from pruneware.engine.attention_preview import PreviewDone, run_preview
from pruneware.engine.kv_caches import cache_of, output_cache, padding_of, static_length, unwrap_mask
from pruneware.engine.layer_inputs import level_kwargs
from pruneware.engine.levels import Level, as_root, next_level, root_level, write_visual
from pruneware.engine.plan_source import NOMINAL_VISUAL_TOKENS, PlanSource
from pruneware.engine.pre_llm import decode_inputs, prune_inputs
from pruneware.engine.request import RequestState, RequestTracker
from pruneware.engine.stage_runner import Selection, attention_policy_scores, run_stage
from pruneware.engine.vision_tower_reads import VisionSide, reads_to_positions, resize_budget, vision_needs
from pruneware.kernels.gather import gather_rows
from pruneware.plans.plan import Plan, PlanError, Stage
from pruneware.policies import AttentionPolicy
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
        on_report: Callable[[Report], Any] | None = None,
    ):
        self.model = model
        self.adapter: Adapter = adapter_for(model)
        self.source = PlanSource.create(plan, self.adapter, avg_tokens)
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
        self._rates_text = any(getattr(self.source.policy(plan, i), "rates_text", False) for i in range(len(plan.stages)))

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
        read, resize = self._vision_reads
        if read or resize:
            budget = resize_budget(self.source) if resize else None
            self._vision = VisionSide(self.model, self.adapter, self._requests, read, budget)
            self._handles.extend(self._vision.install())

    # hooks -----------------------------------------------------------------------------
    def _on_vision(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        self._requests.saw_vision(output, self.adapter.vision_grid(args, kwargs))

    def _on_encoder_input(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
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
            state.decoding, state.past0 = True, past
            for level in state.levels:
                level.cache.clear()
            return
        if input_ids is None:
            raise ValueError("pruneware locates visual tokens from input_ids: pass input_ids, not inputs_embeds")
        static_len = static_length(cache)  # refuses a cache the engine cannot drive
        layout = self.adapter.layout(input_ids, {**kwargs, "seen_vision": self._requests.take_vision()})
        n_visual = layout.counts
        sample_plans = self.source.sample_plans(n_visual)  # raises before any layer runs
        plan = next((p for p, n in zip(sample_plans, n_visual, strict=True) if n), sample_plans[0])
        report = Report(n_layers=self._n_layers, plan=str(plan), sample_plans=[str(p) for p in sample_plans])
        state = RequestState(
            layout, plan, sample_plans, n_visual, report,
            position_inputs=self.adapter.position_inputs(input_ids, kwargs), static_len=static_len,
        )
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
        if state.decoding:
            return args, decode_inputs(state, kwargs, embeds, positions, mask, masks.mask_kind(self._attn))
        state.input_length = state.q_length = embeds.shape[1]
        state.injections = self.adapter.take_injections(kwargs)
        layout = state.layout
        root = root_level(layout.image_ids.to(embeds.device), state.n_visual, layout.sizes, layout.visual_span)
        pre = state.plan.stages[0] if state.plan.stages[0].where == "pre" else None
        full = None  # a 4-D mask generate() prebuilt for a static cache
        if mask is not None and mask.dim() == 4 and state.static_len is not None:
            full, mask = mask, padding_of(mask, embeds.shape[0], embeds.shape[1])
        elif mask is not None and mask.dim() != 2:
            raise ValueError("pruneware needs a 2-D attention_mask [batch, length] (or none) at the language model")
        state.input_padding = None if mask is None else (mask == 0).sum(dim=1)  # [B], for the report
        if pre is None:
            state.levels, state.starts = [root], [0]
            state.padding0 = None if mask is None else mask.bool()
            state.lm_embeds = embeds if self._rates_text else None
            return args, kwargs
        selection = self._run(state, 0, pre, root, embeds)
        level = next_level(root, selection.keep)
        pruned = prune_inputs(
            self.adapter, pre, level, selection, embeds, mask, positions, state.position_inputs,
        )
        state.levels, state.starts = [as_root(level)], [0]
        state.padding0 = pruned.mask.bool()
        state.lm_embeds = pruned.embeds if self._rates_text else None
        state.last_position = pruned.positions[..., -1]
        state.rewritten = pruned.rewritten
        new_mask = pruned.mask if full is None else masks.slice_static_prefill_mask(
            full, level.index_prev, level.valid, embeds.shape[1], state.static_len, masks.mask_kind(self._attn), embeds.dtype
        )
        kwargs.update(inputs_embeds=pruned.embeds, attention_mask=new_mask, position_ids=pruned.positions)
        return args, kwargs

    def _on_language_model_done(self, module: nn.Module, args: tuple, output: Any) -> None:
        state = self._requests.current
        if state is None or state.decoding:
            return
        state.injections = None
        state.position_inputs = {}
        state.lm_embeds = state.raters = None
        state.report.vision_flops = self._requests.take_tower_flops()
        self._requests.bind(output_cache(output), state)  # a cache the model made itself
        per_layer = [state.level_for(i)[0] for i in range(self._n_layers)]
        finish_report(
            state.report, state.input_padding, [lvl.n_slots for lvl in state.levels], [lvl.n_visual for lvl in state.levels],
            per_layer, state.input_length, self._text_config,
        )
        self._requests.completed(state.report)
        if self.on_report is not None:
            self.on_report(state.report)

    def _layer_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
            state = self._requests.current
            if state is None:
                return None
            if not state.decoding:
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
        if isinstance(policy, AttentionPolicy) and policy.attention_layer == "own":
            self._preview_attention(state, layer, parent, hidden, kwargs)
        selection = self._run(state, stage_index, stage, parent, hidden)
        level = next_level(parent, selection.keep)
        level.stage = stage
        state.levels.append(level)
        state.starts.append(layer)
        recycled = selection.merged is not None and policy.recycles
        if level.same_as_prev and not recycled:
            return args
        if not level.same_as_prev:
            (hidden,) = gather_rows(level.index_prev, hidden)
        if recycled:
            hidden = write_visual(level, hidden, selection.merged.embeds)
        if args:
            return (hidden, *args[1:])
        kwargs["hidden_states"] = hidden
        return args

    def _preview_attention(self, state: RequestState, layer: int, parent: Level, hidden: torch.Tensor, kwargs) -> None:
        """Score layer `layer`'s own attention rows on its unpruned input (see attention_preview.py)."""
        if not parent.identity:
            kwargs = {**kwargs, **self._sliced_kwargs(state, parent, layer, kwargs)}
        state.preview = layer
        try:
            run_preview(self.adapter.layers[layer], hidden, kwargs)
        finally:
            state.preview = None

    def _sliced_kwargs(self, state: RequestState, level: Level, layer: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        key = ("kwargs", self.adapter.layer_group(layer))  # layers of a group share mask and RoPE
        if key not in level.cache:
            level.cache[key] = level_kwargs(
                level, kwargs, kind=masks.mask_kind(self._attn), compact=level.stage.positions == "compact",
                rotary=self.adapter.rope_tables, decoding=state.decoding,
                level0_length=state.levels[0].length, past0=state.past0, q_length=state.q_length,
                static_len=state.static_len,
            )
        return level.cache[key]  # type: ignore[return-value]

    def _inject_hook(self, layer: int):
        """After an early layer: add the model's per-layer visual features to the kept tokens."""

        def hook(module: nn.Module, args: tuple, output: Any):
            state = self._requests.current
            if state is None or state.decoding or state.injections is None:
                return None
            level = state.level_for(layer)[1]
            if isinstance(output, tuple):
                return (state.injections.add(output[0], layer, level.orig, level.valid), *output[1:])
            return state.injections.add(output, layer, level.orig, level.valid)

        return hook

    def _on_attention(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, mask: Any) -> None:
        """Score visual tokens for the stage at layer_idx + 1 (or at layer_idx, in a preview).

        query: [B, H, Ls, d]; key: [B, Hkv, Ls, d].
        """
        state = self._requests.current
        if state is None or state.decoding:
            return
        preview = state.preview == module.layer_idx
        target = module.layer_idx if preview else module.layer_idx + 1
        stage_index = self.source.stage_index_at(state.plan, target)
        if stage_index is None:
            return
        policy = self.source.policy(state.plan, stage_index)
        if not isinstance(policy, AttentionPolicy) or (policy.attention_layer == "own") != preview:
            return
        _, level = state.level_for(module.layer_idx)
        real = state.real_tokens(level)
        if state.static_len is not None:  # a static cache returns all its slots; the prefill fills the first Ls
            key = key[:, :, : level.length]
        rows = self._raters(state, policy).gather(1, level.index0) if policy.rates_text else None
        state.captured[target] = attention_policy_scores(
            policy, level.visual, real, query, key, getattr(module, "scaling", None), rows
        )
        if preview:
            raise PreviewDone

    def _raters(self, state: RequestState, policy: AttentionPolicy) -> torch.Tensor:
        """[B, L0] bool: the policy's rater slots, chosen once per prefill from the LM's input."""
        if state.raters is None:
            if state.lm_embeds is None:
                raise RuntimeError(f"{policy.name} rates text from the language model's input, which was not recorded")
            root = state.levels[0]
            real = state.real_tokens(root)
            rows, row_valid = policy.query_rows(root.visual, real)
            text = torch.zeros_like(real).scatter_(1, rows, row_valid)
            with torch.no_grad():
                state.raters = policy.raters(state.lm_embeds, root.visual, text)
        return state.raters

    # selection ---------------------------------------------------------------------------
    def _run(self, state: RequestState, stage_index: int, stage: Stage, level: Level, hidden: torch.Tensor) -> Selection:
        policy = self.source.policy(state.plan, stage_index)
        attention = None
        if isinstance(policy, AttentionPolicy):
            if stage.layer not in state.captured:
                source = stage.layer if policy.attention_layer == "own" else stage.layer - 1
                raise PlanError(f"stage {stage}: no attention rows were captured at layer {source}; "
                                "its attention did not run through the pruneware capture")
            attention = state.captured.pop(stage.layer)
        vision = None
        if stage.where == "pre" and self._vision is not None:
            vision = reads_to_positions(
                self._requests.take_vision_reads(), state.layout.image_ids.to(hidden.device), state.layout.grids,
                "keys" in policy.vision,
            )
        real = None
        if isinstance(policy, AttentionPolicy):
            real = state.real_tokens(level)
            if policy.final_norm:
                with torch.no_grad():
                    hidden = self.adapter.language_model.norm(hidden)
        selection = run_stage(
            policy, stage, level, hidden, state.n_visual, self.seed * 1_000_003 + stage_index,
            state.layout.grids, attention, sample_stages=state.sample_stages(stage_index), vision=vision, real=real,
        )
        state.report.stages.append(selection.report)
        return selection
