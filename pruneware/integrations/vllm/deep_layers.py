"""In-LLM stages in vLLM: decoder layers >= K run on the tokens the stage keeps.

A stage before decoder layer K (`random@20`, Information Horizon's second stage) drops visual
tokens from layers >= K only. vLLM gives every layer of a KV-cache group the same attention
metadata: one block table, one sequence length and one slot per token per request. pruneware
keeps that block table and gives the layers of each pruned *level* (layers K_i .. K_{i+1}-1)
their own view of it, rebuilt at the level's first layer in the middle of the step:

- the level's KV sequence is the request's tokens minus those dropped so far, **compacted**:
  token t of a request sits at KV index c = t - (tokens of that request dropped before it), in
  the blocks of the level's own KV-cache groups, which `deep_kv` sizes for the kept tokens
  (without the hybrid KV-cache manager, in the full sequence's blocks: c <= t);
- its query rows are the step's tokens still alive; `query_start_loc`, `seq_lens` and the slot
  mapping are rebuilt from the group's own metadata and handed to the backend's own metadata
  builder, so every backend that builds from `CommonAttentionMetadata` works unchanged;
- how many tokens each request dropped in earlier steps is kept per level in a table indexed by
  the request's first block id (unique per running request with prefix caching off, which
  in-LLM plans require): decoding adds one token per step to every level.

Which tokens a level drops arrives with the embeddings (an offset channel, see `positions`) when
policies that read no states (`Needs.states`) decide it before the forward; attention-scored
stages (`fastv@K`) decide it at their layer from layer K-1's queries and keys (`deep_scoring`).
After the final norm each original row takes the output of the last row of its request at or
before it that is still alive, so the runner's logits rows (a prompt's last token, decode
tokens) read the same state as in the HF path.

This module imports vllm only inside functions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pruneware.integrations.vllm import deep_scoring
from pruneware.plans.plan import Stage
from pruneware.policies import get_policy


IN_LLM_TESTED = ((0, 32),)  # vLLM releases the in-LLM path is tested against (forward context, builders)


@dataclass
class LevelLayout:
    """The tokens of one step alive at a pruned level, and where they sit in its KV cache.

    Attributes:
        alive: [n] rows of the step (0..N-1) alive at the level.
        query_start_loc: [R + 1] the level's query rows per request.
        seq_lens: [R] the level's KV length per request after this step.
        slot_mapping: [n] KV slot of each alive row (in the block table given to `level_layout`).
        kv_index: [n] each alive row's index in its request's compacted KV sequence.
        request: [n] each alive row's request.
        dropped: [R] tokens of each request absent from the level, this step included.
    """

    alive: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    slot_mapping: torch.Tensor
    kv_index: torch.Tensor
    request: torch.Tensor
    dropped: torch.Tensor

    def slots(self, block_table: torch.Tensor, block_size: int) -> torch.Tensor:
        """[n] each alive row's KV slot in `block_table` ([R, max_blocks], a KV-cache group's)."""
        return block_slots(block_table, self.request, self.kv_index, block_size)


def block_slots(block_table: torch.Tensor, request: torch.Tensor, kv_index: torch.Tensor, block_size: int) -> torch.Tensor:
    """[n] KV slots of entries `kv_index` ([n]) of requests `request` ([n]) in `block_table`."""
    return block_table[request, kv_index // block_size].long() * block_size + kv_index % block_size


def level_layout(
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor, token_levels: torch.Tensor,
    level: int, dropped_before: torch.Tensor, block_size: int,
) -> LevelLayout:
    """The layout of pruned level `level` (>= 1) for one step.

    Args:
        query_start_loc: [R + 1] the step's query rows per request (the group's metadata).
        seq_lens: [R] each request's full KV length after the step.
        block_table: [R, max_blocks] the group's block ids.
        token_levels: [N] per step row, the in-LLM stage that drops it (0: none; i + 1: stage i).
        dropped_before: [R] tokens of each request dropped from this level in earlier steps.
    """
    n_rows = token_levels.shape[0]
    device = token_levels.device
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    request = torch.repeat_interleave(torch.arange(q_lens.shape[0], device=device), q_lens, output_size=n_rows)
    gone = (token_levels > 0) & (token_levels <= level)
    cum = torch.cat([torch.zeros(1, dtype=torch.long, device=device), torch.cumsum(gone.long(), 0)])
    step_dropped = cum[query_start_loc[1:]] - cum[query_start_loc[:-1]]
    row = torch.arange(n_rows, device=device)
    full_index = (seq_lens - q_lens)[request] + row - query_start_loc[:-1][request]
    kv_index = full_index - dropped_before[request] - (cum[:-1] - cum[query_start_loc[:-1]][request])
    alive = torch.nonzero(~gone).squeeze(1)
    kv_alive, req_alive = kv_index[alive], request[alive]
    slots = block_slots(block_table, req_alive, kv_alive, block_size)
    alive_lens = q_lens - step_dropped
    qsl = torch.cat([torch.zeros(1, dtype=query_start_loc.dtype, device=device), torch.cumsum(alive_lens, 0)])
    dropped = dropped_before + step_dropped
    return LevelLayout(alive, qsl.to(query_start_loc.dtype), (seq_lens - dropped).to(seq_lens.dtype),
                       slots, kv_alive, req_alive, dropped)


@dataclass
class _Step:
    levels: torch.Tensor | None  # [N] per row, the stage that drops it
    visual: torch.Tensor | None  # [N] bool, rows holding multimodal embeddings
    original: torch.Tensor | None  # [N] a visual row's item token count before pruning
    positions: torch.Tensor  # [N] or [3, N] the step's positions (offsets added)
    query_start_loc: torch.Tensor | None = None  # [R + 1] the current level's rows per request
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None  # level -> layer K-1's (q, k)
    rows: int = 0  # rows of the hidden states the first layer received
    alive: torch.Tensor | None = None  # [n] step rows alive at the current level
    level_positions: torch.Tensor | None = None  # the current level's positions
    base: Any = None  # the group's own metadata
    saved: tuple[dict, dict] | None = None


class DeepLayers:
    """Runs the decoder layers of a vLLM language model with pruneware's in-LLM stages.

    Installs forward pre-hooks on each stage's first layer (the rows and positions it and the
    layers after it receive, and their attention metadata) and a forward hook on the final norm
    (the rows go back to the step's full row count). Hooks act only inside `step`.
    """

    def __init__(self, layers: nn.ModuleList, norm: nn.Module, stages: Sequence[Stage], vllm_config: Any) -> None:
        self.stages = list(stages)
        self.stage_layers = [int(s.where) for s in self.stages]
        self.compact = [s.positions == "compact" for s in self.stages]
        self.scored = [deep_scoring.scored_in_llm(s) for s in self.stages]
        self.own = [get_policy(s.policy).needs.attention == "own" for s in self.stages]
        self.layers = layers
        self.shapes = {i + 1: deep_scoring.attention_shape(layers[k if self.own[i] else k - 1])
                       for i, k in enumerate(self.stage_layers) if self.scored[i]}
        bounds = [*self.stage_layers, len(layers)]
        self.names = [[layers[j].self_attn.attn.layer_name for j in range(bounds[i], bounds[i + 1])]
                      for i in range(len(self.stage_layers))]
        self.vllm_config = vllm_config
        self._step: _Step | None = None
        self._builders: dict[tuple[int, str], Any] = {}
        self._dropped: torch.Tensor | None = None  # [levels, num_blocks]
        level_of = {k: i + 1 for i, k in enumerate(self.stage_layers)}
        for j in range(self.stage_layers[0], len(layers)):  # the model loop passes one `positions` to all
            layers[j].register_forward_pre_hook(self._hook_for(level_of.get(j)), with_kwargs=True)
        norm.register_forward_hook(self._leave)
        for level in (lv for lv in self.shapes if not self.own[lv - 1]):
            layers[self.stage_layers[level - 1] - 1].self_attn.rotary_emb.register_forward_hook(self._capture_for(level))

    @contextmanager
    def step(self, rows: tuple[torch.Tensor, torch.Tensor] | None, positions: torch.Tensor) -> Iterator[None]:
        """One forward step. rows: None (no multimodal rows this step) or ([N, 2] per row the
        in-LLM stage that drops it and its item's token count, [N] bool visual rows);
        positions: the positions the model receives."""
        if rows is None:
            self._step = _Step(None, None, None, positions)
        else:
            self._step = _Step(rows[0][:, 0].clone(), rows[1], rows[0][:, 1], positions)
        try:
            yield
        finally:
            step, self._step = self._step, None
            if step.saved is not None:
                from vllm.forward_context import get_forward_context

                context = get_forward_context()
                context.attn_metadata.clear()
                context.attn_metadata.update(step.saved[0])
                context.slot_mapping.clear()
                context.slot_mapping.update(step.saved[1])

    def _capture_for(self, level: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            step = self._step
            if step is not None and step.levels is not None:
                step.captured = (step.captured or {}) | {level: (output[0], output[1])}
        return hook

    def _hook_for(self, level: int | None):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if level is not None:
                return self._enter(level, args, kwargs)
            step = self._step
            if step is None or step.level_positions is None:
                return None
            return (step.level_positions, *args[1:]), kwargs
        return hook

    def _enter(self, level: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        from vllm.forward_context import get_forward_context, is_forward_context_available

        step = self._step
        if step is None or not is_forward_context_available():
            return None
        context = get_forward_context()
        metadata = context.attn_metadata
        if not isinstance(metadata, dict) or not metadata:
            return None  # a profiling run: every layer sees every row
        positions, hidden, residual = args[:3]
        if step.base is None:
            step.base = metadata[self.names[level - 1][0]]
            step.saved = (dict(metadata), dict(context.slot_mapping))
            step.rows = hidden.shape[0]
            step.alive = torch.arange(step.rows, device=hidden.device)
        base = step.base
        n_actual = int(base.query_start_loc[-1])
        computed = (base.seq_lens - (base.query_start_loc[1:] - base.query_start_loc[:-1])) > 0
        if self.scored[level - 1] and self.own[level - 1] and step.levels is not None:
            current = positions if step.level_positions is None else step.level_positions
            qk = deep_scoring.preview_qk(self.layers[self.stage_layers[level - 1]], current, hidden, residual)
            step.captured = (step.captured or {}) | {level: qk}
        if self.scored[level - 1] and step.captured and level in step.captured:
            self._score(level, step, computed)
        levels = torch.zeros(n_actual, dtype=torch.long, device=hidden.device)
        if step.levels is not None:
            levels = step.levels[:n_actual].to(hidden.device)
        table = self._dropped_table(level, base.block_table)
        first_block = base.block_table[:, 0].long()
        before = torch.where(computed, table[level - 1][first_block], 0)
        block_size = self.vllm_config.cache_config.block_size
        layout = level_layout(base.query_start_loc, base.seq_lens, base.block_table, levels, level, before, block_size)
        table[level - 1][first_block] = layout.dropped
        # Rows of the previous level still alive here (both sorted subsets of the step's rows).
        keep = torch.isin(step.alive, layout.alive)
        step.alive = layout.alive
        hidden = hidden[keep]
        residual = None if residual is None else residual[keep]
        if self.compact[level - 1]:
            kv = layout.kv_index.to(positions.dtype)
            positions = kv.expand(positions.shape[0], -1).contiguous() if positions.dim() == 2 else kv
        else:
            positions = (positions if step.level_positions is None else step.level_positions)[..., keep]
        step.level_positions = positions
        step.query_start_loc = layout.query_start_loc
        self._install(context, level, base, layout, step.saved[0])
        return (positions, hidden, residual, *args[3:]), kwargs

    def _score(self, level: int, step: _Step, computed: torch.Tensor) -> None:
        """Mark the rows scored stage `level` drops in `step.levels` (prefilling requests only:
        their whole prompt is in the step, chunked prefill being off)."""
        q, k = step.captured.pop(level)  # type: ignore[union-attr]
        qsl = step.query_start_loc if step.query_start_loc is not None else step.base.query_start_loc
        rows = step.alive  # current rows -> step rows
        visual, original = step.visual[rows], step.original[rows]  # type: ignore[index]
        requests = [r for r in range(qsl.shape[0] - 1)
                    if not bool(computed[r]) and bool(visual[int(qsl[r]):int(qsl[r + 1])].any())]
        if not requests:
            return
        heads, kv_heads, head_size, scale = self.shapes[level]
        scores = deep_scoring.last_row_attention(q, k, qsl, heads, kv_heads, head_size, scale, requests)
        summed = deep_scoring.all_reduce_heads(torch.cat([scores[r] for r in requests]))
        sizes = [scores[r].shape[0] for r in requests]
        scores = dict(zip(requests, torch.split(summed, sizes), strict=True))
        deep_scoring.choose_dropped(self.stages[level - 1], level, scores, qsl, visual, original, rows, step.levels)

    def _install(self, context: Any, level: int, base: Any, layout: LevelLayout, originals: dict) -> None:
        """Give the level's layers metadata for `layout`, one build per KV-cache group (the level's
        layers have groups of their own when `deep_kv` specs are in use; each has its block table)."""
        from vllm.v1.attention.backend import CommonAttentionMetadata

        lens = layout.query_start_loc[1:] - layout.query_start_loc[:-1]
        groups: dict[int, list[str]] = {}
        for name in self.names[level - 1]:
            groups.setdefault(id(originals[name]), []).append(name)
        for names in groups.values():
            table = originals[names[0]].block_table
            builder = self._builder(level, names)
            slots = layout.slot_mapping if table is base.block_table else layout.slots(
                table, builder.kv_cache_spec.block_size)
            common = CommonAttentionMetadata(
                query_start_loc=layout.query_start_loc, query_start_loc_cpu=layout.query_start_loc.cpu(),
                seq_lens=layout.seq_lens, num_reqs=int(layout.seq_lens.shape[0]),
                num_actual_tokens=int(layout.alive.shape[0]), max_query_len=int(lens.max()) if lens.numel() else 0,
                max_seq_len=int(base.max_seq_len), block_table_tensor=table, slot_mapping=slots, causal=True,
            )
            built = builder.build(0, common)
            for name in names:
                context.attn_metadata[name] = built
                context.slot_mapping[name] = slots

    def _builder(self, level: int, names: list[str]) -> Any:
        key = (level, names[0])
        if key not in self._builders:
            from vllm.forward_context import get_forward_context
            from vllm.model_executor.layers.attention import Attention

            layer: Attention = get_forward_context().no_compile_layers[names[0]]
            spec = layer.get_kv_cache_spec(self.vllm_config)
            builder_cls = layer.attn_backend.get_builder_cls()
            self._builders[key] = builder_cls(spec, names, self.vllm_config, layer.kv_cache.device)
        return self._builders[key]

    def _dropped_table(self, level: int, block_table: torch.Tensor) -> torch.Tensor:
        from vllm.forward_context import get_forward_context

        if self._dropped is None:
            cache = get_forward_context().no_compile_layers[self.names[0][0]].kv_cache
            blocks = max(int(cache.shape[0]), int(cache.shape[1]) if cache.dim() > 1 else 0)
            self._dropped = torch.zeros(len(self.names), blocks + 1, dtype=torch.long, device=block_table.device)
        return self._dropped

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> Any:
        step = self._step
        if step is None or step.base is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        rows = torch.arange(step.rows, device=hidden.device)
        source = (torch.searchsorted(step.alive, rows, right=True) - 1).clamp(min=0)
        full = hidden[source]
        return (full, *output[1:]) if isinstance(output, tuple) else full


def install_deep_layers(model: nn.Module, spec: Any, vllm_config: Any, architecture: str) -> DeepLayers | None:
    """Give `model` (a pruned vLLM multimodal model whose `language_model.model` holds `layers`
    and `norm`) the in-LLM stages of `spec`; None when it has none. Refuses the engine settings
    the layout cannot serve, naming the setting to change."""
    if not spec.deep:
        return None
    from packaging.version import Version

    from pruneware.integrations.vllm import installed_vllm_version

    found = installed_vllm_version()
    if Version(found).release[:2] not in IN_LLM_TESTED:
        tested = ", ".join(".".join(map(str, v)) + ".x" for v in IN_LLM_TESTED)
        raise ValueError(f"{architecture}: in-LLM stages rebuild vLLM's per-layer attention metadata mid-step and "
                         f"are tested against vllm {tested} only; found vllm {found}. Use a 'pre' plan or vllm {tested}")
    problems = []
    if vllm_config.cache_config.enable_prefix_caching:
        problems.append("prefix caching on (pass enable_prefix_caching=False / --no-enable-prefix-caching): "
                        "a cached block's deeper layers hold another request's compacted sequence")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        problems.append("pipeline parallelism (pipeline_parallel_size > 1)")
    if not vllm_config.model_config.enforce_eager:
        problems.append("CUDA graphs / torch.compile (pass enforce_eager=True / --enforce-eager): "
                        "the pruned levels' row counts change inside the step")
    if problems:
        stages = ",".join(str(s) for s in spec.deep)
        raise ValueError(f"{architecture} with in-LLM stages ({stages}) cannot run with " + "; ".join(problems))
    if any(deep_scoring.scored_in_llm(s) for s in spec.deep) and vllm_config.scheduler_config.enable_chunked_prefill:
        raise ValueError(f"{architecture} with attention-scored in-LLM stages needs each prompt in one step: pass "
                         "enable_chunked_prefill=False / --no-enable-chunked-prefill (and max_num_batched_tokens >= "
                         "the longest prompt)")
    decoder = model.language_model.model
    deep = DeepLayers(decoder.layers, decoder.norm, spec.deep, vllm_config)
    if vllm_config.scheduler_config.disable_hybrid_kv_cache_manager:
        return deep  # one KV-cache group: the levels compact into the full sequence's blocks
    from pruneware.integrations.vllm import deep_kv

    deep_kv.use_level_specs(decoder.layers, deep.stage_layers, spec.deep, *item_token_rule(vllm_config.model_config.hf_config))
    return deep


def item_token_rule(hf_config: Any) -> tuple[int, int]:
    """(tokens of every item before pruning, or 0 when they follow the item's grid; the grid's merge
    size) for `deep_kv`'s accounting: LLaVA-1.5's CLIP tower gives each image (image_size /
    patch_size)^2 tokens ([CLS] dropped); Qwen's merger gives t * h * w / merge^2 per item."""
    vision = hf_config.vision_config
    merge = getattr(vision, "spatial_merge_size", None)
    if merge is not None:
        return 0, int(merge)
    cls_token = int(getattr(hf_config, "vision_feature_select_strategy", "default") == "full")
    return (vision.image_size // vision.patch_size) ** 2 + cls_token, 1
