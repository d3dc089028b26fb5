"""`adapters/rope_tables.py`: a 1-D RoPE's tables in fewer ops, the module's values bit for bit;
any other rotary module is called as it is."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from pruneware.adapters.rope_tables import is_plain_rope, rope_tables
from pruneware.engine.profiling import forward_cost


def rotary(rope_parameters: dict | None = None) -> LlamaRotaryEmbedding:
    config = LlamaConfig(hidden_size=96, num_attention_heads=3, max_position_embeddings=4096)
    if rope_parameters is not None:
        config.rope_parameters = {**config.rope_parameters, **rope_parameters}
    return LlamaRotaryEmbedding(config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rope", [None, {"rope_type": "linear", "factor": 2.0},
                                  {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}],
                         ids=["default", "linear", "yarn"])
def test_the_tables_are_the_modules_bit_for_bit(dtype, rope):
    module = rotary(rope)
    assert is_plain_rope(module)
    positions = torch.tensor([[0, 1, 577, 4095], [3, 0, 0, 9]])
    like = torch.zeros(1, dtype=dtype)
    with torch.no_grad():
        cos, sin = rope_tables(module, like, positions)
        want_cos, want_sin = module(like, positions)
    assert cos.dtype == want_cos.dtype == dtype
    assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)


def test_fewer_ops_for_float32_tables():
    module, positions, like = rotary(), torch.tensor([[5, 0], [0, 0]]), torch.zeros(1)
    with torch.no_grad():
        assert forward_cost(lambda: rope_tables(module, like, positions)).ops == 5
        assert forward_cost(lambda: module(like, positions)).ops > 5


def test_other_modules_are_called_as_they_are():
    dynamic = rotary({"rope_type": "dynamic", "factor": 2.0})
    assert not is_plain_rope(dynamic)  # its forward updates inv_freq from the positions
    calls = []

    class Custom(torch.nn.Module):
        def forward(self, x, positions):
            calls.append(positions)
            return x, x

    assert not is_plain_rope(Custom())
    rope_tables(Custom(), torch.zeros(1), torch.tensor([[1]]))
    assert len(calls) == 1
