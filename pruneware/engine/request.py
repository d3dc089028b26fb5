"""Run-time state of one request (one forward, or one `generate` with its decode steps).

A Session only installs hooks; everything a call needs while it runs lives here, so that one
attached model can serve concurrent `generate` calls from several threads, as plain HF does:

  - the call in flight on this thread (or asyncio task) is a context variable, set when the
    multimodal base model starts and cleared when it returns, errors included;
  - a prefill's state is also keyed (weakly) on its KV cache, where the decode steps of that
    same sequence find it again, on whatever thread they run; it goes with the cache;
  - vision-tower outputs seen before a forward (`generate()` encodes pixels first) wait in a
    context variable of the thread that produced them;
  - the last completed report is per thread, and can also be handed to an `on_report` callback.
"""

from __future__ import annotations

import threading
import weakref
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from pruneware.adapters import VisualInjections, VisualLayout
from pruneware.engine.levels import Level, as_root
from pruneware.plans.plan import Plan, Stage
from pruneware.report import Report

# Every tracker's context-local values live in this one variable, keyed by tracker: a
# ContextVar per tracker would stay, with its last value, in every context that ever set it,
# so a thread that creates sessions (a `with prune(...)` per request) would grow by one set of
# them per session, forever.
_SLOTS: ContextVar[dict[Any, Any]] = ContextVar("pruneware_requests", default={})


class _ContextSlot:
    """A context-local value of one tracker, read and set like a ContextVar; set back to empty
    (None, 0 or ()), it leaves no entry behind. The shared dict is copied on write, never
    changed in place, so contexts (threads, asyncio tasks) never see each other's values."""

    def __init__(self, default: Any) -> None:
        self._default = default

    def get(self) -> Any:
        return _SLOTS.get().get(self, self._default)

    def set(self, value: Any) -> None:
        slots = dict(_SLOTS.get())
        if value is None or (type(value) in (tuple, int) and not value):
            slots.pop(self, None)
        else:
            slots[self] = value
        _SLOTS.set(slots)


@dataclass
class PrefillState:
    """What only the prefill reads: its input, its report and what its stages capture.

    Attributes:
        layout: where the visual tokens are ([B, L] image ids and per-sample grids).
        sample_plans: per sample, the plan with that sample's own budgets (they differ only
            under `avg_tokens`, solved for each sample's own visual-token count).
        n_visual: per sample, its visual tokens before pruning.
        report: this call's report, filled during prefill.
        position_inputs: the adapter's, for a merging `pre` stage.
        input_real: [B] real (unpadded) tokens of each sample's input (for the report; a host list when the layout read it).
        lm_positions: (position ids or None, 2-D padding mask or None) the language model got
            after a `pre` stage, for scores read at the positions a sample has alone (key_positions.py).
        captured: stage layer K -> [B, Ls] attention scores captured at layer K-1 (or at K).
        preview: the layer whose attention is being previewed (`Needs(attention="own")`).
        injections: model-added per-layer visual features.
        lm_embeds: [B, L0, D] the LM's prefill input, while a policy rates text.
        raters: [B, L0] bool rater slots (`Needs(raters=True)`).
        finite: per stage whose policy reads states, (stage, [B] bool: they were finite),
            read at the report's one host sync.
    """

    layout: VisualLayout
    sample_plans: list[Plan]
    n_visual: list[int]
    report: Report
    position_inputs: dict[str, Any] = field(default_factory=dict)
    input_real: torch.Tensor | list[int] | None = None
    lm_positions: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
    captured: dict[int, torch.Tensor] = field(default_factory=dict)
    preview: int | None = None
    injections: VisualInjections | None = None
    lm_embeds: torch.Tensor | None = None
    raters: torch.Tensor | None = None
    finite: list[tuple[Stage, torch.Tensor]] = field(default_factory=list)

    def release(self) -> None:
        """Drop what the prefill no longer needs once the language model has run."""
        self.injections = None
        self.position_inputs = {}
        self.lm_embeds = self.raters = None
        self.lm_positions = (None, None)


@dataclass
class DecodeState:
    """What the decode steps read: left by the prefill, advanced at every step.

    Attributes:
        active: the current call is a decode step.
        past0: the level-0 cache length before the step (0 at prefill).
        q_length: the call's new tokens (the whole input at prefill).
        input_length: L, the language model's input length before a `pre` stage.
        last_position: [..., B] position of the last prefill token (after a `pre` stage).
        rewritten: a `pre` stage rewrote positions, so decode recomputes them.
        folded: the stage at layer 0 whose level became level 0 (see `RequestState.fold_layer0`).
    """

    active: bool = False
    past0: int = 0
    q_length: int = 0
    input_length: int = 0
    last_position: torch.Tensor | None = None
    rewritten: bool = False
    folded: Stage | None = None


@dataclass
class RequestState:
    """One sequence's state: set at prefill, read at every decode step.

    Attributes:
        plan: the plan whose stages (places and policies) every sample runs.
        prefill: what only the prefill reads (see `PrefillState`).
        decode: what the decode steps read (see `DecodeState`).
        levels, starts: the kept sequence of each level and the first layer it covers.
        padding0: [B, L0] bool key padding at level 0.
        static_len: a static cache's `max_cache_len` (see kv_caches.py), None for a dynamic cache.
    """

    plan: Plan
    prefill: PrefillState
    decode: DecodeState = field(default_factory=DecodeState)
    levels: list[Level] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    padding0: torch.Tensor | None = None
    static_len: int | None = None

    def level_for(self, layer: int) -> tuple[int, Level]:
        i = max(j for j, start in enumerate(self.starts) if start <= layer)
        return i, self.levels[i]

    def fold_layer0(self) -> None:
        """Before the first decode step: make the level of a stage at layer 0 the new level 0.

        Such a stage leaves every cache layer the shorter sequence, so the cache length and the
        mask that the model loop builds from cache layer 0 count that level's slots, as after a
        `pre` stage; the decode steps then remap the language model's inputs as they do there
        (see pre_llm.py). Later levels are re-expressed against it. No-op otherwise.
        """
        if self.decode.folded is not None or len(self.starts) < 2 or self.starts[1] != 0:
            return
        root, level = self.levels[0], self.levels[1]
        index = level.index_prev if root.is_root else root.index_prev.gather(1, level.index_prev)
        self.padding0 = self.real_tokens(level)
        folded = [as_root(Level(index, level.index0, level.orig, level.valid, level.image_ids,
                                n_slots=level.n_slots, n_visual=level.n_visual, stage=level.stage))]
        for later in self.levels[2:]:
            index0 = later.index_prev if len(folded) == 1 else folded[-1].index0.gather(1, later.index_prev)
            folded.append(Level(later.index_prev, index0, later.orig, later.valid, later.image_ids,
                                n_slots=later.n_slots, n_visual=later.n_visual, stage=later.stage))
        folded[0].stage = level.stage
        self.levels, self.starts = folded, [0, *self.starts[2:]]
        self.decode.folded = level.stage
        if self.decode.last_position is None:  # positions were the model's default, 0..L-1
            self.decode.last_position = torch.full(
                (index.shape[0],), self.decode.input_length - 1, dtype=torch.long, device=index.device
            )

    def real_tokens(self, level: Level) -> torch.Tensor:
        """[B, Ls] bool: the level's slots holding a real (not padding) token."""
        if self.padding0 is None:
            return level.valid
        if level.identity:  # level 0: its slots are padding0's, whose padding covers the invalid ones
            return self.padding0
        if "real" not in level.cache:  # read by the capture and by the stage: made once per level and forward
            real = self.padding0.gather(1, level.index0)
            level.cache["real"] = real if level.all_valid else level.valid & real
        return level.cache["real"]  # type: ignore[return-value]

    def sample_stages(self, index: int) -> list[Stage]:
        """Stage `index` as each sample runs it (its own budget)."""
        return [plan.stages[index] for plan in self.prefill.sample_plans]


class RequestTracker:
    """Where a session finds the state of the call running on the current thread."""

    def __init__(self) -> None:
        self._current = _ContextSlot(None)  # RequestState | None
        self._depth = _ContextSlot(0)
        self._vision = _ContextSlot(())
        self._vision_reads = _ContextSlot(())
        self._tower_flops = _ContextSlot(())
        self._by_cache: weakref.WeakKeyDictionary[Any, RequestState] = weakref.WeakKeyDictionary()
        self._encodings: dict[int, tuple] = {}  # id(encoder output) -> (grids, reads, flops), see replay_encoding
        self._lock = threading.Lock()
        self._local = threading.local()

    # the call in flight --------------------------------------------------------------------
    def enter(self) -> None:
        """A top-level forward starts on this thread. Raises if one is already running here."""
        depth = self._depth.get()
        self._depth.set(depth + 1)
        if depth:
            raise RuntimeError(
                "pruneware session re-entered: this model was called again on the same thread while one of "
                "its forwards was still running (e.g. from a policy, hook or callback); finish that call first"
            )

    def exit(self) -> None:
        """The forward that `enter` opened returned or raised."""
        depth = self._depth.get() - 1
        self._depth.set(max(depth, 0))
        if depth <= 0:
            self._current.set(None)
            self._vision.set(())
            self._vision_reads.set(())
            self._tower_flops.set(())

    @property
    def current(self) -> RequestState | None:
        return self._current.get()

    def start(self, state: RequestState, cache: Any) -> None:
        """Make `state` this thread's call, and the state of `cache`'s later decode steps."""
        self._current.set(state)
        self.bind(cache, state)

    def resume(self, cache: Any) -> RequestState | None:
        """The state a prefill left on `cache`, now this thread's call (None if unknown)."""
        with self._lock:
            state = self._by_cache.get(cache) if cache is not None else None
        self._current.set(state)
        return state

    def bind(self, cache: Any, state: RequestState) -> None:
        if cache is not None:
            with self._lock:
                self._by_cache[cache] = state

    # vision-tower calls before a forward ----------------------------------------------------
    def saw_vision(self, output: Any, grid_thw: torch.Tensor | None) -> None:
        self._vision.set((*self._vision.get(), (output, grid_thw)))

    def replay_encoding(self, encoder_outputs: dict | None) -> None:
        """Make the vision-tower calls behind `encoder_outputs` seen by this forward too.

        `generate()` encodes the pixels once and passes the features (`mm_encoder_outputs`) to
        every forward; with `use_cache=False` each step is a new prefill that no tower call
        precedes. A forward that follows fresh tower calls files what they gave (grids, reads,
        FLOPs) under each features object; a later forward on the same objects, with no fresh
        call, gets it again. Filed weakly: it goes when generate() drops the features.
        """
        outputs = [o for o in (encoder_outputs or {}).values() if o is not None]
        if not outputs:
            return
        fresh = (self._vision.get(), self._vision_reads.get(), self._tower_flops.get())
        with self._lock:
            if any(fresh):
                for output in outputs:
                    grids = [grid for seen, grid in fresh[0] if seen is output]  # no strong ref to the output
                    if id(output) not in self._encodings:
                        weakref.finalize(output, self._forget_encoding, id(output))
                    self._encodings[id(output)] = (grids, fresh[1], fresh[2])
                return
            filed = [self._encodings.get(id(output)) for output in outputs]
        if any(f is None for f in filed) or any(f[1] is not filed[0][1] for f in filed):  # one encoding
            return
        self._vision.set(tuple((o, grid) for o, f in zip(outputs, filed, strict=True) for grid in f[0]))
        self._vision_reads.set(filed[0][1])
        self._tower_flops.set(filed[0][2])

    def _forget_encoding(self, key: int) -> None:
        with self._lock:
            self._encodings.pop(key, None)

    def take_vision(self) -> list[tuple[Any, torch.Tensor | None]]:
        seen = list(self._vision.get())
        self._vision.set(())
        return seen

    def saw_vision_read(self, read: Any) -> None:
        """What a vision-side hook read from one encoder call (see `pruneware.engine.vision_tower_reads`)."""
        self._vision_reads.set((*self._vision_reads.get(), read))

    def take_vision_reads(self) -> list[Any]:
        reads = list(self._vision_reads.get())
        self._vision_reads.set(())
        return reads

    def saw_tower_input(self, flops: list[float]) -> None:
        """Per image, the FLOPs of one vision-encoder call on the input it actually received."""
        self._tower_flops.set((*self._tower_flops.get(), *flops))

    def take_tower_flops(self) -> list[float]:
        flops = list(self._tower_flops.get())
        self._tower_flops.set(())
        return flops

    # reports -------------------------------------------------------------------------------
    @property
    def last_report(self) -> Report | None:
        return getattr(self._local, "report", None)

    def completed(self, report: Report) -> None:
        self._local.report = report

    def clear(self) -> None:
        """Forget every cache's state, and empty this context's slots (the session is detached):
        a vision-tower call outside a forward (`get_image_features` alone) leaves what it saw
        there otherwise, since only the end of a top-level forward empties them."""
        with self._lock:
            self._by_cache.clear()
            self._encodings.clear()
        for slot, empty in ((self._current, None), (self._depth, 0), (self._vision, ()), (self._vision_reads, ()),
                            (self._tower_flops, ())):
            slot.set(empty)
