"""The papers' exact schedules, reachable by name (`pruneware.prune(model, "adaptinfer-llava-64")`).

Each entry is the plan the official code runs, written in pruneware's grammar, for the model the
paper ran. A paper labels a schedule by the average visual tokens it *reports*; `true_average`
is what pruneware's report measures: the visual tokens each decoder layer computes, averaged
over all layers (AdaptInfer's code counts each pruning layer after its own pruning, so its
"64" computes 82.9 tokens per layer).

Sources (read at the commits cited in docs/methods.md):
- AdaptInfer, LLaVA-1.5-7B (32 layers): github.com/weiczh02/AdaptInfer-base
  `llava/model/language_model/score.py`: `pruning_loc = [1, 10, 20]` (attention read inside
  layer L, L's output pruned: stages before layers 2, 11, 21), `sparse_token_dict` counts,
  k = min(count, tokens left - 1); `modelling_sparse_llama.py` re-indexes positions
  (`position_ids[:, :kept]`): `compact`.
- AdaptInfer, Qwen2-VL (28 layers): `qwen2_vl/SparseQwen/score.py` `sparse_token_dict` ratios of
  the tokens left, `int()`-truncated; `pruning_loc` default `[0, 9, 19]`
  (`qwen2_vl/eval/model_vqa_qwen.py`), so stages before layers 1, 10, 20; `builder.py` keeps
  the original M-RoPE positions: `keep`.
- SparseVLM, LLaVA-1.5-7B: github.com/Gumpest/SparseVLMs @ `26a5f48`
  `llava/model/language_model/score.py`: `sparse_token_dict` (v1.0, the default `USE_VERSION`),
  `layer_dict = {2: 0, 6: 1, 15: 2}` (attention read inside layer L, L's output pruned: stages
  before 3, 7, 16), k = min(count, tokens left - 1); each stage also recycles its pruned tokens
  into a few merged ones, which the true average counts; `modelling_sparse_llama.py` re-indexes
  positions: `compact`.
- Information Horizon, LLaVA-1.5-7B: DivPrune before the LLM, random pruning before layer 20,
  positions re-indexed. The counts are the paper's (its repository,
  github.com/YahongWang1/Information-Horizon, holds only a README: "Code will be released soon").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """A paper's exact plan: `plan` in pruneware's grammar, for `model` with `n_visual` tokens."""

    name: str
    plan: str
    paper: str
    label: str  # the paper's own name for it (its reported average, or its preset key)
    model: str
    n_layers: int
    n_visual: int | None  # visual tokens the counts were set for; None for ratio schedules
    scaled: str  # the preset that scales this method to other depths and takes avg_tokens


def _adaptinfer_llava(label: str, counts: tuple[int, int, int]) -> Schedule:
    plan = ",".join(f"adaptinfer@{layer}:{c}:compact" for layer, c in zip((2, 11, 21), counts, strict=True))
    return Schedule(
        f"adaptinfer-llava-{label}", plan, "AdaptInfer", f'"{label}"', "LLaVA-1.5-7B", 32, 576, "adaptinfer"
    )


def _adaptinfer_qwen(label: str, ratios: tuple[float, float, float]) -> Schedule:
    plan = ",".join(f"adaptinfer@{layer}:*{r}" for layer, r in zip((1, 10, 20), ratios, strict=True))
    return Schedule(
        f"adaptinfer-qwen2vl-{label}", plan, "AdaptInfer", f"retained_tokens={label}", "Qwen2-VL-2B", 28, None,
        "adaptinfer",
    )


def _horizon(label: str, counts: tuple[int, int]) -> Schedule:
    plan = f"divprune@pre:{counts[0]}:compact,random@20:{counts[1]}:compact"
    return Schedule(
        f"info-horizon-{label}", plan, "Information Horizon", f'"{label}"', "LLaVA-1.5-7B", 32, 576, "info-horizon"
    )


def _sparsevlm(label: str, counts: tuple[int, int, int]) -> Schedule:
    plan = ",".join(f"sparsevlm@{layer}:{c}:compact" for layer, c in zip((3, 7, 16), counts, strict=True))
    return Schedule(f"sparsevlm-llava-{label}", plan, "SparseVLM", f'"{label}"', "LLaVA-1.5-7B", 32, 576, "sparsevlm")


SCHEDULES: tuple[Schedule, ...] = (
    _adaptinfer_llava("128", (290, 72, 18)),
    _adaptinfer_llava("64", (133, 27, 3)),
    _adaptinfer_llava("48", (80, 24, 2)),
    _adaptinfer_llava("32", (40, 12, 0)),
    _adaptinfer_qwen("10", (0.17, 0.6, 0.3)),
    _adaptinfer_qwen("30", (0.5, 0.6, 0.3)),
    _adaptinfer_qwen("50", (0.7, 0.9, 0.3)),
    _horizon("64", (96, 10)),
    _horizon("192", (284, 38)),
    _sparsevlm("192", (300, 200, 110)),
    _sparsevlm("128", (303, 110, 36)),
    _sparsevlm("64", (66, 30, 17)),
)
