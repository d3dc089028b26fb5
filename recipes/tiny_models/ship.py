"""Ship a trained checkpoint as an embedded model, in the serving layout.

    python -m recipes.tiny_models.ship training/tiny-llava/joint29/step-500 tiny-llava

Copies the HF folder (training layout, as the recipe writes it) to
`pruneware/models/weights/<name>/` and converts it in place to the serving layout (head size 32,
hub key names: `pruneware.models.serving_layout`), which vLLM loads and transformers loads alike.
Then checks that both compute the same last-token logits on the first questions of the reporting
split; `benchmarks/serving_layout_check.py` runs the longer comparison.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from pruneware.models import MODELS, WEIGHTS_DIR
from pruneware.models.serving_layout import convert_checkpoint

FILES = ("config.json", "model.safetensors", "generation_config.json", "chat_template.jinja",
         "processor_config.json", "tokenizer.json", "tokenizer_config.json")


def ship(source: Path, name: str, check: int = 20) -> Path:
    if name not in MODELS:
        raise SystemExit(f"unknown embedded model {name!r}; valid: {sorted(MODELS)}")
    target = WEIGHTS_DIR / name
    target.mkdir(parents=True, exist_ok=True)
    for file in FILES:
        if (source / file).is_file():
            shutil.copy2(source / file, target / file)
    convert_checkpoint(target)
    if check:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from pruneware.evals.synthetic import make_split
        from pruneware.evals.synthetic.accuracy import build_prompt

        processor = AutoProcessor.from_pretrained(source)
        examples = make_split("eval", check, seed=0)
        inputs = processor(text=[build_prompt(processor, e.question) for e in examples],
                           images=[e.image for e in examples], return_tensors="pt", padding=True)
        with torch.inference_mode():
            old, new = (AutoModelForImageTextToText.from_pretrained(p).eval()(**inputs).logits[:, -1] for p in (source, target))
        diff = (old - new).abs().max().item()
        print(f"shipped {source} as {name} ({target}); max |logit difference| on {check} questions: {diff:.2e}")
        if diff > 1e-4:
            raise SystemExit("the serving layout changed the model's logits; not shipped")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="an HF folder written by the recipe (training layout)")
    parser.add_argument("name", help=f"embedded model name: {', '.join(sorted(MODELS))}")
    parser.add_argument("--check", type=int, default=20, help="questions to compare logits on (0: skip)")
    args = parser.parse_args()
    ship(args.source, args.name, args.check)


if __name__ == "__main__":
    main()
