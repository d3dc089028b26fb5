"""The fused final norm (`pruneware.adapters.final_norm`) gives the module's numbers bit for bit
on the CPU, in one op for float32 states, and calls any other norm as is."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from pruneware.adapters.final_norm import final_norm, is_llama_rms_norm
from pruneware.engine.profiling import forward_cost
from tests.tiny import tiny_llava, tiny_qwen


@pytest.mark.parametrize("cls", [LlamaRMSNorm, Qwen2RMSNorm])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [1, 37, 64, 577])
def test_the_fused_norm_is_the_module_bit_for_bit(cls, dtype, dim):
    norm = cls(dim, eps=1e-6).to(dtype)
    generator = torch.Generator().manual_seed(dim)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(dim, generator=generator) * 2 - 0.5)
        states = (torch.randn(2, 63, dim, generator=generator) * 3).to(dtype)
        assert is_llama_rms_norm(norm)
        assert torch.equal(final_norm(norm, states), norm(states))


@pytest.mark.parametrize("build", [tiny_llava, tiny_qwen])
def test_the_tiny_models_final_norms_take_the_fused_path(build):
    norm = build().model.language_model.norm
    states = torch.randn(1, 9, norm.weight.shape[0])
    assert is_llama_rms_norm(norm)
    with torch.no_grad():
        assert torch.equal(final_norm(norm, states), norm(states))
        assert forward_cost(lambda: final_norm(norm, states)).ops == 1
        assert forward_cost(lambda: norm(states)).ops > 1


class GemmaStyleNorm(nn.Module):
    """A norm of another form (1 + weight, epsilon named `eps`): never taken for the fused one."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), 0.5))
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


def test_other_norms_are_called_as_they_are():
    norm = GemmaStyleNorm(8)
    states = torch.randn(2, 3, 8)
    assert not is_llama_rms_norm(norm) and not is_llama_rms_norm(nn.LayerNorm(8))
    with torch.no_grad():
        assert torch.equal(final_norm(norm, states), norm(states))
        layer = nn.LayerNorm(8)
        assert torch.equal(final_norm(layer, states), layer(states))
