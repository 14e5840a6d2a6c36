"""Gemma 2 (and, through ``gemma3.py``, Gemma 3 text): the Llama-family blocks with Gemma's changes.

What differs from Llama, each as transformers computes it: ``(1 + w)`` RMSNorms (``GemmaRMSNorm``),
four per layer (after attention and around the MLP as well); a GeGLU MLP (tanh GELU); the
embedding scaled by ``sqrt(hidden)`` rounded to the activation dtype; attention scaled by
``query_pre_attn_scalar ** -0.5``; sliding-window attention on the layers ``config.layer_types``
names (the attention backends mask by the window, every KV page stays, so the prefix cache is
unchanged); attention logit soft-capping (Gemma 2) in the backends; the final logits soft-capped.
The projections, attention and weight loading are Llama's (``llama.py``), TP-sharded the same way.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from treadle.gpu_worker.layers.activation import GeluAndMul
from treadle.gpu_worker.layers.attention import Attention, layer_windows
from treadle.gpu_worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from treadle.gpu_worker.layers.norm import GemmaRMSNorm
from treadle.gpu_worker.layers.rotary import RotaryEmbedding, rope_parameters
from treadle.gpu_worker.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, head_dim_of

GELU = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu": "none"}


def gelu_approximate(config) -> str:
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None) or "gelu_pytorch_tanh"
    if act not in GELU:
        raise ValueError(f"hidden_activation {act!r} is not a GELU this model builds; choose from {sorted(GELU)}")
    return GELU[act]


class GemmaAttention(LlamaAttention):
    """Llama's attention with Gemma's scale, this layer's window and soft-cap, and (Gemma 3) a
    per-head ``(1 + w)`` RMSNorm of q and k before RoPE."""

    def __init__(self, config, layer_id: int, rotary: RotaryEmbedding, window: Optional[int],
                 logit_cap: Optional[float], qk_norm: bool):
        bias = bool(getattr(config, "attention_bias", False))
        super().__init__(config, layer_id, rotary, bias, bias)
        a, self.head_dim = self.attn, head_dim_of(config)
        self.attn = Attention(a.num_heads, a.num_kv_heads, a.head_dim, config.query_pre_attn_scalar ** -0.5,
                              layer_id, sliding_window=window, logit_cap=logit_cap)
        self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        if self.q_norm is not None:
            q = self.q_norm(q.unflatten(-1, (-1, self.head_dim))).flatten(-2)
            k = self.k_norm(k.unflatten(-1, (-1, self.head_dim))).flatten(-2)
        return self.o_proj(self.attn(q, k, v, rotary=self.rotary_emb))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config, layer_id: int, rotary: RotaryEmbedding, window: Optional[int],
                 logit_cap: Optional[float], qk_norm: bool):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = GemmaAttention(config, layer_id, rotary, window, logit_cap, qk_norm)
        self.mlp = LlamaMLP(h, config.intermediate_size, False)
        self.mlp.act_fn = GeluAndMul(gelu_approximate(config))
        self.input_layernorm, self.post_attention_layernorm = GemmaRMSNorm(h, eps), GemmaRMSNorm(h, eps)
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = GemmaRMSNorm(h, eps), GemmaRMSNorm(h, eps)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: the scaled embedding (``residual`` None) or the previous layer's normed MLP
        output, which the input norm adds to the residual stream first."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(x))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class GemmaModel(nn.Module):
    """The decoder stack (one pipeline stage: ``start``/``end`` are what ``LlamaForCausalLM``'s
    loader reads). ``rotaries``: one RoPE table per layer type (Gemma 3: local and global bases)."""

    def __init__(self, config, rotaries: dict[str, RotaryEmbedding], logit_cap: Optional[float], qk_norm: bool):
        super().__init__()
        n = config.num_hidden_layers
        self.start, self.end, self.hidden = 0, n, config.hidden_size
        types = list(getattr(config, "layer_types", None) or ["full_attention"] * n)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(config, i, rotaries.get(types[i], rotaries["full_attention"]), w, logit_cap, qk_norm)
            for i, w in enumerate(layer_windows(config)))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, carry=None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # sqrt(hidden) rounded to the activation dtype, as HF; a host float, so graph capture copies nothing
        x = x * torch.tensor(self.hidden ** 0.5, dtype=x.dtype, device="cpu").item()
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual)
        return self.norm(x, residual)[0]


class Gemma2ForCausalLM(LlamaForCausalLM):
    """Loads like Llama (fused qkv / gate_up, tied head); the final logits soft-capped."""

    supports_pp = False
    qk_norm = False  # Gemma 3: q/k norms
    attn_softcap = True  # transformers applies attn_logit_softcapping in Gemma 2 only

    def __init__(self, config, max_positions: Optional[int] = None):
        nn.Module.__init__(self)
        self.config = config
        positions = max_positions or config.max_position_embeddings
        cap = getattr(config, "attn_logit_softcapping", None) if self.attn_softcap else None
        self.model = GemmaModel(config, self.rotaries(config, positions), cap, self.qk_norm)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tied = bool(getattr(config, "tie_word_embeddings", True))
        if self.tied:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.final_cap = getattr(config, "final_logit_softcapping", None)

    @staticmethod
    def rotaries(config, positions: int) -> dict[str, RotaryEmbedding]:
        return {"full_attention": RotaryEmbedding(head_dim_of(config), positions, rope_parameters(config))}

    def forward(self, input_ids: torch.Tensor, carry=None) -> torch.Tensor:
        return self.model(input_ids)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        if self.final_cap:
            logits = torch.tanh(logits / self.final_cap) * self.final_cap
        return logits
