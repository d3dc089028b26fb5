"""Config folders with LLaVA-1.5-7B and Qwen2.5-VL-7B shapes, written offline, for
`vllm serve --load-format dummy` (random weights of the real shapes; nothing is downloaded).

    python benchmarks/serving_shapes.py llava-1.5-7b /tmp/shapes/llava
    python benchmarks/vllm_serving.py --model /tmp/shapes/llava --load-format dummy

Each folder starts from the embedded tiny model of the same family (pruneware/models/weights:
its chat template, processor and WordLevel tokenizer), with the sizes of the real checkpoint
written into config.json and the tokenizer's vocabulary padded with filler words up to the real
vocabulary size (so any id the random weights generate decodes). The prompt's text tokens are
therefore fewer than the real tokenizer's; the visual tokens per image are the real ones:
576 for LLaVA-1.5 (336 px, patch 14) and 576 for Qwen2.5-VL at a fixed 672 x 672 (patch 14,
merge 2). Only the stdlib is used.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

WEIGHTS = Path(__file__).resolve().parents[1] / "pruneware" / "models" / "weights"

SHAPES = {
    "llava-1.5-7b": ("tiny-llava", {
        "text_config": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                        "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "vocab_size": 32064,
                        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}},
        "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                          "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "projection_dim": 768},
        "vision_feature_layer": -2, "dtype": "float16",
    }, None),
    "qwen2.5-vl-7b": ("tiny-qwen2.5-vl", {
        "text_config": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                        "num_attention_heads": 28, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 152064,
                        "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "max_window_layers": 28,
                        "layer_types": ["full_attention"] * 28,
                        "rope_parameters": {"mrope_section": [16, 24, 24], "rope_theta": 1000000.0, "rope_type": "default"}},
        "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                          "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "window_size": 112,
                          "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2},
        "dtype": "bfloat16",
    }, {"patch_size": 14, "size": {"shortest_edge": 672 * 672, "longest_edge": 672 * 672}}),
}


def _merge(base: dict, update: dict) -> dict:
    for key, value in update.items():
        base[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) and key != "rope_parameters" else value
    return base


def write_shapes(name: str, out: str | Path) -> Path:
    """Write the config folder for `name` (see SHAPES) into `out`; returns it."""
    tiny, sizes, processor = SHAPES[name]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for path in (WEIGHTS / tiny).iterdir():
        if path.suffix not in (".safetensors", ".bin"):
            shutil.copy(path, out / path.name)
    config = _merge(json.loads((out / "config.json").read_text()), sizes)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer = json.loads((out / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    used = set(vocab.values()) | {t["id"] for t in tokenizer.get("added_tokens", [])}
    for i in range(sizes["text_config"]["vocab_size"]):
        if i not in used:
            vocab[f"f{i}"] = i
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    if processor:
        record = json.loads((out / "processor_config.json").read_text())
        for part in ("image_processor", "video_processor"):
            if part in record:
                record[part] |= processor
        (out / "processor_config.json").write_text(json.dumps(record, indent=1))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in SHAPES:
        sys.exit(f"usage: python {sys.argv[0]} {{{','.join(SHAPES)}}} OUT_DIR")
    print(write_shapes(sys.argv[1], sys.argv[2]))
