"""Average the weights of several checkpoints of one training chain (a uniform "model soup").

    python -m recipes.tiny_models.average --out training/tiny-llava/soup1 \\
        training/tiny-llava/joint24/step-900 training/tiny-llava/joint25/step-600

Every input is a plain HF folder of the same architecture and config (e.g. ``OUT/step-N`` snapshots
of the stage-3 runs, or a shipped model and a fine-tune of it). The output holds the element-wise mean
of their floating-point tensors, the first input's config and processor, and loads like any of them.
Averaging checkpoints that share a starting point is Wortsman et al., "Model soups" (ICML 2022);
whether it helps is measured, like any checkpoint, on a held-out split, never on the reporting split.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .common import save_hf_folder


def average_state(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of floating-point tensors (in float32, cast back); other tensors must agree."""
    keys = set(states[0])
    for s in states[1:]:
        if set(s) != keys:
            raise ValueError(f"checkpoints differ in their tensors: {sorted(keys ^ set(s))[:5]}")
    out = {}
    for k, first in states[0].items():
        if first.is_floating_point():
            out[k] = torch.stack([s[k].float() for s in states]).mean(0).to(first.dtype)
        elif all(torch.equal(first, s[k]) for s in states[1:]):
            out[k] = first
        else:
            raise ValueError(f"non-float tensor {k} differs between checkpoints; cannot average it")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", type=Path, nargs="+", help="two or more HF folders of one architecture")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if len(args.inputs) < 2:
        ap.error("give at least two checkpoints to average")
    from pruneware.models.loading import load_any

    model, processor = load_any(str(args.inputs[0]), device="cpu")
    others = [load_any(str(p), device="cpu")[0] for p in args.inputs[1:]]
    config = lambda m: {k: v for k, v in m.config.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    for path, other in zip(args.inputs[1:], others):
        if config(other) != config(model):
            raise SystemExit(f"{path} has a different config from {args.inputs[0]}; only one chain's checkpoints average")
    model.load_state_dict(average_state([model.state_dict()] + [m.state_dict() for m in others]))
    save_hf_folder(model, processor, args.out)
    print(f"averaged {len(args.inputs)} checkpoints into {args.out}")


if __name__ == "__main__":
    main()
