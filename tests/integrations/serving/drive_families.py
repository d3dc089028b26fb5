"""Driver for test_families.py: run tiny LLaVA-NeXT / Qwen2-VL / Qwen3-VL checkpoints through the
real vLLM engine with the plugin, one engine per plan, one after another in this process.

    .venv-vllm/bin/python -m tests.integrations.serving.drive_families '{"family": "qwen2-vl", ...}'

Arguments (JSON): family; dir (the checkpoint folder, written with seeded random weights when it
holds no config); plans (list; null = the base architecture); max_tokens; engine (extra LLM
kwargs). Prints one JSON line last: per plan, per request, the placeholder count, the prompt
length and the greedy token ids (generated twice, to show determinism).
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import numpy as np

SIZES = [(224, 168), (168, 280), (196, 196)]  # (width, height) of the test images
TEXT = {
    "llava-next": "w1 w2 <image> w3 w4 w5",
    "qwen2-vl": "w1 <|vision_start|><|image_pad|><|vision_end|> w2 w3 w4",
    "qwen3-vl": "w1 <|vision_start|><|image_pad|><|vision_end|> w2 w3 w4",
}
PLACEHOLDER = {"llava-next": "<image>", "qwen2-vl": "<|image_pad|>", "qwen3-vl": "<|image_pad|>"}


def write_checkpoint(family: str, folder: Path) -> None:
    from pruneware.integrations.vllm import tiny

    if family == "llava-next":
        tiny.write_tiny_llava_next(folder)
    else:
        tiny.write_tiny_qwen_family(folder, family)
    tiny.write_random_weights(folder)


def requests(family: str) -> list[dict]:
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]
    return [{"prompt": TEXT[family], "multi_modal_data": {"image": image}} for image in images]


def grids(family: str, folder: str) -> list[list[int]]:
    """Per image, the grid the plugin prunes: (side, h, w) for LLaVA-NeXT, (1, rows, cols) for Qwen."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    out = []
    for width, height in SIZES:
        if family == "llava-next":
            from pruneware.integrations.vllm.llava_next import anyres_grid

            out.append(list(anyres_grid(config, height, width)))
        else:
            from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

            from pruneware.integrations.vllm.tiny import QWEN_PIXELS, QWEN_UNIT

            h, w = smart_resize(height, width, QWEN_UNIT, QWEN_PIXELS["shortest_edge"], QWEN_PIXELS["longest_edge"])
            out.append([1, h // QWEN_UNIT, w // QWEN_UNIT])
    return out


def run(args: dict) -> dict:
    from vllm import SamplingParams

    from pruneware.integrations.vllm.offline import build_llm
    from pruneware.integrations.vllm.tiny import VOCAB

    family, folder = args["family"], Path(args["dir"])
    if not (folder / "config.json").is_file():
        write_checkpoint(family, folder)
    placeholder = VOCAB[PLACEHOLDER[family]]
    params = SamplingParams(max_tokens=args.get("max_tokens", 6), temperature=0.0)
    results = []
    for plan in args["plans"]:
        # mm_processor_cache_gb=0: every plan processes the same images afresh (no cached items).
        engine = {"max_model_len": 1024, "mm_processor_cache_gb": 0} | args.get("engine", {})
        llm = build_llm(str(folder), plan, seed=0, **engine)
        reqs = requests(family)
        first = llm.generate(reqs, params, use_tqdm=False)
        again = llm.generate(reqs, params, use_tqdm=False)
        results.append({
            "plan": plan,
            "placeholders": [o.prompt_token_ids.count(placeholder) for o in first],
            "prompt_lengths": [len(o.prompt_token_ids) for o in first],
            "tokens": [list(o.outputs[0].token_ids) for o in first],
            "tokens_again": [list(o.outputs[0].token_ids) for o in again],
        })
        del llm
        gc.collect()
    return {"family": family, "grids": grids(family, str(folder)), "runs": results}


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
