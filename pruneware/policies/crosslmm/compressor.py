"""CrossLMM's trained V2V compressor: pooled tokens attend to their image's original tokens
through small learned projections, added through a tanh gate initialised at 0 (so an untrained
compressor is plain average pooling). Saved as safetensors plus a small JSON config (the file
names keep their original `crosslmm_adapter.*` spelling, so directories trained before load).
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

CONFIG_NAME = "crosslmm_adapter.json"  # on-disk names: unchanged, see above
WEIGHTS_NAME = "crosslmm_adapter.safetensors"
FORMAT_VERSION = 1


class CompressorError(ValueError):
    """A compressor directory that is missing, malformed, or does not fit the model."""


class V2VCompressor(nn.Module):
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


def save_compressor(compressor: V2VCompressor, directory: str | Path, extra: dict | None = None) -> Path:
    """Write `crosslmm_adapter.safetensors` and `crosslmm_adapter.json` into `directory`."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in compressor.state_dict().items()}, str(out / WEIGHTS_NAME))
    (out / CONFIG_NAME).write_text(json.dumps({**compressor.config(), **(extra or {})}, indent=1))
    return out


@lru_cache(maxsize=8)
def _load(directory: str) -> V2VCompressor:
    root = Path(directory)
    config_path, weights_path = root / CONFIG_NAME, root / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise CompressorError(f"{directory} is not a CrossLMM compressor: expected {CONFIG_NAME} and {WEIGHTS_NAME} in it")
    try:
        config = json.loads(config_path.read_text())
        dim, rank = int(config["dim"]), int(config["rank"])
    except (ValueError, KeyError, TypeError) as err:
        raise CompressorError(f"{config_path}: malformed compressor config ({err}); expected JSON with 'dim' and 'rank'") from None
    if config.get("kind") != "v2v" or config.get("format_version") != FORMAT_VERSION:
        raise CompressorError(f"{config_path}: unsupported compressor kind/version {config.get('kind')!r}/{config.get('format_version')!r}")
    compressor = V2VCompressor(dim, rank)
    try:
        state = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types
        raise CompressorError(f"{weights_path}: unreadable safetensors file ({err})") from None
    expected = {k: tuple(v.shape) for k, v in compressor.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        raise CompressorError(f"{weights_path}: tensors {got} do not match the config's shapes {expected}")
    compressor.load_state_dict(state)
    return compressor.eval()


_LIVE: dict[str, V2VCompressor] = {}


@contextmanager
def live_compressor(compressor: V2VCompressor) -> Iterator[str]:
    """Make an in-memory compressor usable as `crosslmm[compressor=<key>]` (for training)."""
    key = f"live-{id(compressor)}"
    _LIVE[key] = compressor
    try:
        yield key
    finally:
        _LIVE.pop(key, None)


def load_compressor(directory: str | Path, dim: int) -> V2VCompressor:
    """Load a saved compressor and check it fits embeddings of width `dim`."""
    live = _LIVE.get(str(directory))
    compressor = live if live is not None else _load(str(Path(directory).resolve()))
    if compressor.dim != dim:
        raise CompressorError(
            f"compressor in {directory} was trained for embeddings of width {compressor.dim}, but this model's are {dim}"
        )
    return compressor
