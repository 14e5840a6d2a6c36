"""RoPE scaling types against HF transformers' own rotary modules: the cos/sin our table holds
for each position equal what HF computes for a sequence ending there (float32)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, Phi3Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from treadle.gpu_worker.layers.rotary import RotaryEmbedding, rope_parameters

LLAMA = dict(hidden_size=128, num_attention_heads=4, max_position_embeddings=256)


def hf_cos_sin(rope: torch.nn.Module, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's cos/sin for positions 0..n-1 of one sequence (its half: both halves are equal)."""
    x = torch.zeros(1, n, 8)
    cos, sin = rope(x, torch.arange(n)[None])
    half = cos.shape[-1] // 2
    return cos[0, :, :half], sin[0, :, :half]


def ours(config, positions: int) -> RotaryEmbedding:
    return RotaryEmbedding(config.hidden_size // config.num_attention_heads, positions, rope_parameters(config))


@pytest.mark.parametrize("scaling", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 16, "beta_slow": 2,
     "mscale": 1.0, "mscale_all_dim": 0.5},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128, "attention_factor": 1.3,
     "truncate": False},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
])
def test_llama_scalings_match_hf_within_the_trained_length(scaling):
    cfg = LlamaConfig(**LLAMA, rope_scaling=dict(scaling))
    rope = ours(cfg, 256)
    cos, sin = hf_cos_sin(LlamaRotaryEmbedding(cfg), 256)
    assert torch.equal(rope.cos, cos) and torch.equal(rope.sin, sin)
    if scaling["rope_type"] == "yarn":  # the attention factor really scales the table
        assert not torch.allclose(rope.cos[0], torch.ones_like(rope.cos[0]))


def test_dynamic_ntk_past_the_limit_uses_hf_base_for_that_length():
    cfg = LlamaConfig(**LLAMA, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    rope = ours(cfg, 300)
    for n in (257, 300):  # HF recomputes the base for the whole sequence; our row n-1 holds the same
        cos, sin = hf_cos_sin(LlamaRotaryEmbedding(cfg), n)
        assert torch.allclose(rope.cos[n - 1], cos[-1], atol=1e-5)
        assert torch.allclose(rope.sin[n - 1], sin[-1], atol=1e-5)
    default = ours(LlamaConfig(**LLAMA), 300)
    assert torch.equal(rope.cos[:256], default.cos[:256]) and not torch.allclose(rope.cos[299], default.cos[299])


def phi3(partial: float = 1.0) -> Phi3Config:
    dim = int(32 * partial) // 2
    return Phi3Config(hidden_size=128, num_attention_heads=4, max_position_embeddings=512,
                      original_max_position_embeddings=128, partial_rotary_factor=partial,
                      rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(dim)],
                                    "long_factor": [2.0 + 0.5 * i for i in range(dim)]})


@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_longrope_short_then_long_factors_and_attention_factor(partial):
    cfg = phi3(partial)
    rope = ours(cfg, 512)
    assert rope.rot_dim == int(32 * partial)
    cos, sin = hf_cos_sin(Phi3RotaryEmbedding(cfg), 128)  # within the original length: short factors
    assert torch.equal(rope.cos[:128], cos) and torch.equal(rope.sin[:128], sin)
    cos, sin = hf_cos_sin(Phi3RotaryEmbedding(cfg), 300)  # past it HF takes the long factors everywhere
    assert torch.equal(rope.cos[128:300], cos[128:]) and torch.equal(rope.sin[128:300], sin[128:])
    attention = math.sqrt(1 + math.log(512 / 128) / math.log(128))  # HF's LongRoPE factor on cos/sin
    assert abs(float(rope.cos[0, 0]) - attention) < 1e-6


def test_partial_rotary_leaves_the_rest_of_each_head():
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    cfg = phi3(0.5)
    rope = ours(cfg, 512)
    torch.manual_seed(0)
    q, k = torch.randn(5, 4 * 32), torch.randn(5, 2 * 32)
    pos = torch.tensor([0, 3, 7, 100, 127])
    got_q, got_k = rope(pos, q, k)
    cos, sin = Phi3RotaryEmbedding(cfg)(q[None], pos[None])
    want_q, want_k = apply_rotary_pos_emb(q.view(1, 5, 4, 32).transpose(1, 2), k.view(1, 5, 2, 32).transpose(1, 2),
                                          cos, sin)
    assert torch.allclose(got_q, want_q.transpose(1, 2).reshape(5, -1), atol=1e-6)
    assert torch.allclose(got_k, want_k.transpose(1, 2).reshape(5, -1), atol=1e-6)
    assert torch.equal(got_q.view(5, 4, 32)[..., 16:], q.view(5, 4, 32)[..., 16:])


def test_scaled_context_is_counted_as_sglang_does():
    from treadle.runtime.hf_config import model_positions

    base = {"max_position_embeddings": 4096}
    assert model_positions(base) == 4096
    assert model_positions({**base, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}) == 8192
    linear = {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}
    assert model_positions({**base, "rope_parameters": linear}) == 16384
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}
    assert model_positions({**base, "rope_scaling": yarn}) == 4096  # the max is already the stretched length
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    assert model_positions({**base, "rope_scaling": llama3}) == 4096
    assert model_positions({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}) == 4096


@pytest.mark.parametrize("scaling", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "longrope", "original_max_position_embeddings": 64, "short_factor": [1.0] * 16,
     "long_factor": [2.0] * 16},
])
def test_tables_build_under_another_default_device(scaling):
    """The worker builds its model under the CUDA default device; the table is computed on the
    host and moved, never mixing devices (caught on an H100: YaRN and LongRoPE failed there).
    The meta device stands in for CUDA here: a CPU tensor mixed with a meta one fails the same way."""
    cfg = LlamaConfig(**LLAMA, rope_scaling=dict(scaling))
    expected = ours(cfg, 256)
    with torch.device("meta"):
        rope = ours(cfg, 256)
    assert rope.cos.device.type == "meta" and rope.cos.shape == expected.cos.shape
