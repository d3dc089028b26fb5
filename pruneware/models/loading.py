"""Load a model by embedded name, local folder, or (only when asked) Hugging Face hub id."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class ModelLoadError(ValueError):
    """The model name is unknown, the folder is not a model, or the hub could not be reached."""


def load_any(name: str, download: bool = False, device: str | None = None):
    """`(model, processor)` in eval mode on `device` (default: cuda when available, else cpu)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as hf_logging

    from pruneware import models

    hf_logging.disable_progress_bar()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name in models.MODELS:
        if name not in models.available():
            raise ModelLoadError(f"embedded model {name!r} has no weights in this install; shipped: {models.available()}")
        return models.load(name, device=device)
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"{local} is not a model folder (no config.json)")
        source, kwargs = str(local), {"local_files_only": True}
    elif download:
        source, kwargs = name, {}
    else:
        raise ModelLoadError(
            f"unknown model {name!r}: not an embedded model ({', '.join(models.MODELS)}) nor a local folder; "
            "pass --download to fetch a Hugging Face hub id"
        )
    try:
        model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
        processor = AutoProcessor.from_pretrained(source, **kwargs)
    except OSError as err:
        raise ModelLoadError(f"could not load {name!r} ({str(err).splitlines()[0]}); offline? check the id or path") from None
    return model.to(device).eval(), processor


def weights_fingerprint(model) -> str:
    """A short content hash of ``model``'s weights, cheap at any size and the same on any device.

    Hashes every parameter's and buffer's name, shape, dtype and its first and last 64 values
    (as stored), so a retrained checkpoint with the same architecture gets another fingerprint.
    """
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        ends = torch.cat([flat[:64], flat[-64:]]).cpu().contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(ends.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


__all__: list[Any] = ["ModelLoadError", "load_any", "weights_fingerprint"]
