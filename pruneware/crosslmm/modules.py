"""The V2V adapter: pooled tokens attend to their image's original tokens through small
learned projections, added through a tanh gate initialised at 0 (so an untrained adapter is
plain average pooling). Saved as safetensors plus a small JSON config.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_NAME = "crosslmm_adapter.json"
WEIGHTS_NAME = "crosslmm_adapter.safetensors"
FORMAT_VERSION = 1


class AdapterError(ValueError):
    """An adapter directory that is missing, malformed, or does not fit the model."""


class V2VAdapter(nn.Module):
    """refined = pooled + tanh(gate) * softmax(Wq p . Wk x / sqrt(r)) Wv x.

    pooled: [P, D] pooled tokens of one image; tokens: [N, D] its original tokens.
    """

    def __init__(self, dim: int, rank: int = 64):
        super().__init__()
        self.dim, self.rank = dim, rank
        self.query = nn.Linear(dim, rank, bias=False)
        self.key = nn.Linear(dim, rank, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.gate = nn.Parameter(torch.zeros(1))
        nn.init.normal_(self.query.weight, std=dim**-0.5)
        nn.init.normal_(self.key.weight, std=dim**-0.5)
        nn.init.eye_(self.value.weight)

    def forward(self, pooled: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        dtype = pooled.dtype
        p, x = pooled.to(self.query.weight.dtype), tokens.to(self.query.weight.dtype)
        weights = torch.softmax(self.query(p) @ self.key(x).T * self.rank**-0.5, dim=-1)  # [P, N]
        return (p + torch.tanh(self.gate) * (weights @ self.value(x))).to(dtype)

    def config(self) -> dict:
        return {"format_version": FORMAT_VERSION, "kind": "v2v", "dim": self.dim, "rank": self.rank}


def save_adapter(adapter: V2VAdapter, directory: str | Path, extra: dict | None = None) -> Path:
    """Write `crosslmm_adapter.safetensors` and `crosslmm_adapter.json` into `directory`."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}, str(out / WEIGHTS_NAME))
    (out / CONFIG_NAME).write_text(json.dumps({**adapter.config(), **(extra or {})}, indent=1))
    return out


@lru_cache(maxsize=8)
def _load(directory: str) -> V2VAdapter:
    root = Path(directory)
    config_path, weights_path = root / CONFIG_NAME, root / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise AdapterError(f"{directory} is not a CrossLMM adapter: expected {CONFIG_NAME} and {WEIGHTS_NAME} in it")
    try:
        config = json.loads(config_path.read_text())
        dim, rank = int(config["dim"]), int(config["rank"])
    except (ValueError, KeyError, TypeError) as err:
        raise AdapterError(f"{config_path}: malformed adapter config ({err}); expected JSON with 'dim' and 'rank'") from None
    if config.get("kind") != "v2v" or config.get("format_version") != FORMAT_VERSION:
        raise AdapterError(f"{config_path}: unsupported adapter kind/version {config.get('kind')!r}/{config.get('format_version')!r}")
    adapter = V2VAdapter(dim, rank)
    try:
        state = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types
        raise AdapterError(f"{weights_path}: unreadable safetensors file ({err})") from None
    expected = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        raise AdapterError(f"{weights_path}: tensors {got} do not match the config's shapes {expected}")
    adapter.load_state_dict(state)
    return adapter.eval()


_LIVE: dict[str, V2VAdapter] = {}


@contextmanager
def live_adapter(adapter: V2VAdapter) -> Iterator[str]:
    """Make an in-memory adapter usable as `crosslmm[adapter=<key>]` (for training)."""
    key = f"live-{id(adapter)}"
    _LIVE[key] = adapter
    try:
        yield key
    finally:
        _LIVE.pop(key, None)


def load_adapter(directory: str | Path, dim: int) -> V2VAdapter:
    """Load a saved adapter and check it fits embeddings of width `dim`."""
    live = _LIVE.get(str(directory))
    adapter = live if live is not None else _load(str(Path(directory).resolve()))
    if adapter.dim != dim:
        raise AdapterError(
            f"adapter in {directory} was trained for embeddings of width {adapter.dim}, but this model's are {dim}"
        )
    return adapter
