"""Shared pieces of the staged recipe: train-split seeds, scenes, pixels, checkpoints, LR."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pruneware.evals.synthetic.split import SEED_SPACE, _scene_for
from pruneware.evals.synthetic.scene import IMAGE_SIZE, Scene

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
SELECT_SEED = 4242  # selection split (eval seed space); the reporting split uses seed 0


def train_seed(tag: str, seed: int, step: int, i: int) -> int:
    """Train-split scene seed (< 10**9) of item ``i`` of batch ``step`` of stage ``tag``."""
    d = hashlib.blake2b(f"{tag}:{seed}:{step}:{i}".encode(), digest_size=8).digest()
    return int.from_bytes(d, "little") % SEED_SPACE


def sample(seed_value: int, task: str, max_objects: int) -> tuple[Scene, np.random.Generator]:
    """A scene biased for ``task`` (as the benchmark builds them) and the generator after it."""
    rng = np.random.default_rng(seed_value)
    return _scene_for(task, rng, max_objects), rng


def clip_pixels(image) -> torch.Tensor:
    """CLIP-normalised pixels [3, S, S] of a rendered ``IMAGE_SIZE`` image (equals the tiny
    LLaVA processor's output to 1e-6; no resize is needed at this size)."""
    x = np.asarray(image, dtype=np.float32) / 255.0
    assert x.shape[:2] == (IMAGE_SIZE, IMAGE_SIZE)
    return torch.from_numpy(((x - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1).copy())


def lr_at(step: int, steps: int, base: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 5% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = min((step - warmup) / max(steps - warmup, 1), 1.0)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def save_checkpoint(folder: Path, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer, meta: dict) -> None:
    """Weights, AdamW moments and ``meta`` (step, curve state) as safetensors + JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{k}": v.detach().contiguous().cpu() for name, m in modules.items() for k, v in m.state_dict().items()}
    for i, state in opt.state_dict()["state"].items():
        for k, v in state.items():
            tensors[f"opt.{i}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().contiguous().cpu()
    save_file(tensors, str(folder / "state.tmp"))
    (folder / "state.tmp").replace(folder / "state.safetensors")
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


def load_checkpoint(folder: Path, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer | None) -> dict:
    """Restore what :func:`save_checkpoint` wrote; returns its ``meta``."""
    tensors = load_file(str(folder / "state.safetensors"))
    for name, m in modules.items():
        prefix = f"{name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if state or not list(m.state_dict()):
            missing, unexpected = m.load_state_dict(state, strict=False)
            if unexpected or (missing and name != "probes"):
                raise RuntimeError(f"checkpoint {folder}, {name!r}: missing {missing}, unexpected {unexpected}")
            if missing:
                print(f"checkpoint {folder} has no {missing}: they start fresh", flush=True)
        else:
            print(f"checkpoint {folder} has no {name!r}: it starts fresh", flush=True)
    if opt is not None:
        sd = opt.state_dict()
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        sd["state"] = state
        opt.load_state_dict(sd)
    return json.loads((folder / "meta.json").read_text())


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params: list, lr: float) -> None:
    """One AdamW step at ``lr`` (times each group's ``scale``, if any) with gradients clipped to norm 1."""
    for g in opt.param_groups:
        g["lr"] = lr * g.get("scale", 1.0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def save_hf_folder(model, processor, folder: Path) -> None:
    """Save ``model`` and ``processor`` as an HF folder whose tokenizer pads on the left when loaded.

    A tokenizers backend serialises the padding state of its *last call*, so a folder saved after an
    unpadded call would hold ``"padding": null`` and load with right padding, which breaks batched
    generation for anyone loading it with plain transformers.
    """
    tok = processor.tokenizer
    tok.backend_tokenizer.enable_padding(direction="left", pad_id=tok.pad_token_id, pad_token=tok.pad_token)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
