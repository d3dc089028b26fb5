"""KV-cache accounting for in-LLM stages: the deeper levels hold fewer blocks.

vLLM's KV-cache manager allocates `ceil(tokens / block_size)` blocks per request and KV-cache
group. With in-LLM stages, the layers of pruned level i (`DeepLayers`) store only the tokens
still alive there, compacted to the front of their sequence, so they need
`ceil((tokens - absent_i) / block_size)` blocks. This module gives those layers a KV-cache spec of
their own, `DeepLevelSpec` (one per level), registered through vLLM's `KVCacheSpecRegistry` with
`DeepLevelManager`. vLLM's hybrid KV-cache planner then puts each level's layers in KV-cache
groups of their own (own block table, same block pool), and the manager allocates for the
tokens the level keeps. The scheduler's block counts, admission and `kv_cache_usage` then
reflect the pruned share.

How many tokens an item loses at each level follows from the plan, the item's placeholder count
and its token count before pruning (`Stage.keep_count`), which the manager reads from the
request's multimodal features: the grid for Qwen (`image_grid_thw` / `video_grid_thw`), a fixed
count for LLaVA. Only items whose placeholders end inside the allocation are counted, so a
chunk that ends inside an image allocates for all its tokens (never fewer than the layers use).

vLLM extension points used: `KVCacheSpecRegistry.register`, a `FullAttentionManager` subclass,
the attention layers' `get_kv_cache_spec`, and one wrapper around `KVCacheManager.allocate_slots`
that tells the managers which request they allocate for (a manager sees only request ids).
Tested against vllm 0.32 only (`deep_layers.IN_LLM_TESTED`). This module imports vllm.
"""

from __future__ import annotations

import contextvars
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from pruneware.plans.plan import Stage


def alive_counts(stages: Sequence[Stage], kept: int, original: int) -> list[int]:
    """Visual tokens of one item alive after each in-LLM stage.

    kept: the item's placeholder tokens (after any pre-LLM stage); original: its token count before
    any pruning. Each stage keeps `stage.keep_count(original, alive)` of the `alive` tokens it
    receives, as `prune.deep_levels` and `deep_scoring.choose_dropped` do.
    """
    counts, alive = [], kept
    for stage in stages:
        alive = min(alive, stage.keep_count(original, alive)) if alive else 0
        counts.append(alive)
    return counts


@dataclass(frozen=True, kw_only=True)
class DeepLevelSpec(AttentionSpec):
    """The KV cache of the attention layers of pruned level `level` (1-based).

    Derives from `AttentionSpec`, not `FullAttentionSpec`, so that vLLM keeps it out of the
    full-attention group (`FullAttentionSpec.merge` accepts subclasses). The page layout is the
    full-attention one; only the manager's block count differs.

    Attributes:
        level: the pruned level (stage `level - 1` of `stages` is the one it starts at).
        stages: the plan's in-LLM stages, as text (`Stage.parse` reads them).
        item_tokens: an item's tokens before pruning when every item has the same (LLaVA); 0 to
            read it from the item's grid.
        grid_merge: the grid's merge size (Qwen: tokens = t * h * w / grid_merge**2); a field named
            `merge` would hide `KVCacheSpec.merge`.
    """

    level: int
    stages: tuple[str, ...]
    item_tokens: int = 0
    grid_merge: int = 1

    def max_memory_usage_bytes(self, vllm_config: Any) -> int:
        return math.ceil(vllm_config.model_config.max_model_len / self.block_size) * self.page_size_bytes

    @classmethod
    def from_full(cls, full: FullAttentionSpec, level: int, stages: Sequence[Stage], item_tokens: int,
                  merge: int) -> DeepLevelSpec:
        """`full`'s page layout for pruned level `level`."""
        shared = {f.name: getattr(full, f.name) for f in fields(AttentionSpec) if f.init}
        return cls(**shared, level=level, stages=tuple(str(s) for s in stages), item_tokens=item_tokens,
                   grid_merge=merge)

    def item_original(self, data: Any) -> int | None:
        """An item's token count before pruning, from its processed data (None when unknown)."""
        if self.item_tokens:
            return self.item_tokens
        if data is None:
            return None
        for key in ("image_grid_thw", "video_grid_thw"):
            if key in data:
                t, h, w = (int(v) for v in data[key].data.reshape(-1)[:3])
                return t * h * w // (self.grid_merge * self.grid_merge)
        return None

    def absent(self, features: Sequence[Any]) -> list[tuple[int, int]]:
        """For each multimodal item of a request, (end of its placeholders, its tokens absent from
        this level). Items whose original count is unknown count as fully present."""
        stages = [Stage.parse(text) for text in self.stages]
        out = []
        for feature in features:
            position = feature.mm_position
            original = self.item_original(feature.data)
            if original is None:
                continue
            kept = position.get_num_embeds()
            out.append((position.offset + position.length, kept - alive_counts(stages, kept, original)[self.level - 1]))
        return out


_REQUEST: contextvars.ContextVar[Any] = contextvars.ContextVar("pruneware_allocating_request", default=None)


class DeepLevelManager(FullAttentionManager):
    """Allocates a pruned level's blocks for the tokens alive there.

    `num_tokens` (what vLLM asks a manager to hold) becomes `num_tokens - absent`, absent being the
    level's dropped tokens of the request's items that end within `num_tokens`. The request comes
    from `allocate_slots` (see `remember_request`); calls made outside it for a request never seen
    allocate for every token, which is safe.
    """

    def __init__(self, kv_cache_spec: DeepLevelSpec, **kwargs: Any) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self._absent: dict[str, list[tuple[int, int]]] = {}
        remember_request()

    def absent_tokens(self, request_id: str, num_tokens: int) -> int:
        """Tokens of the request's first `num_tokens` this level does not store."""
        items = self._absent.get(request_id)
        if items is None:
            request = _REQUEST.get()
            if request is None or request.request_id != request_id:
                return 0
            items = self._absent[request_id] = self.kv_cache_spec.absent(request.mm_features or ())
        return sum(n for end, n in items if end <= num_tokens)

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int, new_computed_blocks: Any,
                                   total_computed_tokens: int, num_local_computed_tokens: int,
                                   num_tokens_main_model: int, *args: Any, **kwargs: Any) -> int:
        absent = self.absent_tokens(request_id, num_tokens)
        return super().get_num_blocks_to_allocate(
            request_id, num_tokens - absent, new_computed_blocks, total_computed_tokens,
            num_local_computed_tokens, num_tokens_main_model - absent, *args, **kwargs)

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int) -> list:
        absent = self.absent_tokens(request_id, num_tokens)
        return super().allocate_new_blocks(request_id, num_tokens - absent, num_tokens_main_model - absent)

    def free(self, request_id: str) -> None:
        self._absent.pop(request_id, None)
        super().free(request_id)


def remember_request() -> None:
    """Wrap `KVCacheManager.allocate_slots` (once per process) so that the managers of pruned
    levels know which request they allocate for."""
    original = KVCacheManager.allocate_slots
    if getattr(original, "_pruneware", False):
        return

    @functools.wraps(original)
    def allocate_slots(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        token = _REQUEST.set(request)
        try:
            return original(self, request, *args, **kwargs)
        finally:
            _REQUEST.reset(token)

    allocate_slots._pruneware = True  # type: ignore[attr-defined]
    KVCacheManager.allocate_slots = allocate_slots  # type: ignore[method-assign]


def register() -> None:
    """Register `DeepLevelSpec` with its manager (idempotent). vLLM's built-in specs are registered
    first: the registry fills itself only while empty."""
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(DeepLevelSpec, DeepLevelManager, uniform_type_base_spec=DeepLevelSpec)


register()


def use_level_specs(layers: Sequence[Any], stage_layers: Sequence[int], stages: Sequence[Stage], item_tokens: int,
                    merge: int) -> None:
    """Give the attention of each decoder layer >= the first stage its level's `DeepLevelSpec`.

    layers: the decoder layers (each with `self_attn.attn`, a vLLM `Attention`); stage_layers: the
    first layer of each level.
    """
    bounds = [*stage_layers, len(layers)]
    for level in range(1, len(stage_layers) + 1):
        for j in range(bounds[level - 1], bounds[level]):
            attention = layers[j].self_attn.attn
            full_spec = attention.get_kv_cache_spec

            def level_spec(vllm_config: Any, full_spec: Any = full_spec, level: int = level) -> Any:
                spec = full_spec(vllm_config)
                if type(spec) is not FullAttentionSpec or spec.sliding_window is not None:
                    return spec  # only plain full attention is re-specified
                return DeepLevelSpec.from_full(spec, level, stages, item_tokens, merge)

            attention.get_kv_cache_spec = level_spec
