"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2; Qwen3 and Phi-3 build on it) from
the TP-aware layers.

Module names mirror the HF checkpoints (``model.layers.N.self_attn...``) except for the fused
``qkv_proj`` / ``gate_up_proj``, which ``load_weights`` fills from the separate HF tensors (or from
fused ones, as Phi-3 ships them). A bare backbone checkpoint (``layers.N...`` without ``model.``,
as Qwen3-Embedding ships its ``Qwen3Model``) loads too, and may lack the LM head: it serves
embeddings only.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

from treadle.gpu_worker.distributed import pp_rank, pp_size, tp_size
from treadle.gpu_worker.layers.activation import SiluAndMul
from treadle.gpu_worker.layers.attention import Attention, layer_windows
from treadle.gpu_worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from treadle.gpu_worker.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from treadle.gpu_worker.layers.norm import RMSNorm
from treadle.gpu_worker.layers.rotary import QKNormRotary, RotaryEmbedding, rope_parameters
from treadle.gpu_worker.loader import default_weight_loader
from treadle.gpu_worker.models.base import ModelBase
from treadle.gpu_worker.pipeline import MissingLayer, layer_range, owns_layer_tensor


# The names of a bare backbone checkpoint (Qwen3-Embedding's ``Qwen3Model``), ours under ``model.``
BARE_BACKBONE = ("embed_tokens.", "layers.", "norm.")


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate, intermediate], bias)
        self.down_proj = RowParallelLinear(intermediate, hidden, bias)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    """``qk_norm``: Qwen3's RMSNorm over each head of q and k before RoPE."""

    def __init__(self, config, layer_id: int, rotary: RotaryEmbedding, qkv_bias: bool, o_bias: bool,
                 qk_norm: bool = False):
        super().__init__()
        hd, heads = head_dim_of(config), config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, hd, heads, kv_heads, qkv_bias)
        qkv = self.qkv_proj
        self.o_proj = RowParallelLinear(heads * hd, config.hidden_size, o_bias, in_split=(qkv.q_start, qkv.q_size))
        self.split = [self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size]
        self.attn = Attention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, hd, hd**-0.5, layer_id)
        if qk_norm:  # applied with the rotary (one kernel on CUDA)
            self.q_norm, self.k_norm = RMSNorm(hd, config.rms_norm_eps), RMSNorm(hd, config.rms_norm_eps)
            rotary = QKNormRotary(rotary, self.q_norm, self.k_norm)
        self.rotary_emb = rotary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        return self.o_proj(self.attn(q, k, v, rotary=self.rotary_emb))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_id: int, rotary: RotaryEmbedding, qkv_bias: bool, o_bias: bool,
                 qk_norm: bool = False, mlp: Optional[nn.Module] = None):
        """``mlp``: another feed-forward block (mixture-of-experts models); it has ``reduce_results``
        as ``RowParallelLinear`` has."""
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_id, rotary, qkv_bias, o_bias, qk_norm)
        self.mlp = mlp if mlp is not None else LlamaMLP(config.hidden_size, config.intermediate_size,
                                                        getattr(config, "mlp_bias", False))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.defer_reduce = False  # see LlamaModel: o_proj/down_proj hand partial sums to the next norm

    def defer_reduces(self) -> None:
        self.defer_reduce = True
        self.self_attn.o_proj.reduce_results = getattr(self.mlp, "down_proj", self.mlp).reduce_results = False

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: the embedding (``residual`` None) or the previous layer's MLP output, which is a
        partial sum when reduces are deferred; returns this layer's MLP output the same way."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual, reduce=self.defer_reduce)
        x, residual = self.post_attention_layernorm(self.self_attn(x), residual, reduce=self.defer_reduce)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    """The decoder stack; with pipeline parallelism only this stage's part of it (``pipeline.py``):
    layers ``[start, end)`` (KV-cache layer ids counted from ``start``), the embedding on the first
    stage, the final norm on the last."""

    def __init__(self, config, max_positions: int, qkv_bias: bool, o_bias: bool, qk_norm: bool = False,
                 make_mlp: Optional[Callable[[int], Optional[nn.Module]]] = None):
        """``make_mlp(layer_index)``: a layer's feed-forward block, None for the dense ``LlamaMLP``."""
        super().__init__()
        n = config.num_hidden_layers
        self.start, self.end = layer_range(n, pp_rank(), pp_size())
        rotary = RotaryEmbedding(head_dim_of(config), max_positions, rope_parameters(config))
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size) if self.start == 0 else None
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i - self.start, rotary, qkv_bias, o_bias, qk_norm, make_mlp and make_mlp(i))
            if self.start <= i < self.end
            else MissingLayer() for i in range(n))
        for i, window in enumerate(layer_windows(config)):  # Mistral's sliding window (the backends mask by it)
            if self.start <= i < self.end:
                self.layers[i].self_attn.attn.sliding_window = window
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if self.end == n else None
        # With TP on one pipeline stage, the all-reduce of o_proj and down_proj moves into the RMSNorm
        # that follows each (one fused kernel on GPUs of one machine). Bias-free layers only: a bias is
        # added after the reduce. Stages hand on reduced activations, so pipelines keep the plain way.
        self.defer_reduce = tp_size() > 1 and pp_size() == 1 and not o_bias and not getattr(config, "mlp_bias", False)
        if self.defer_reduce:
            for layer in self.layers:
                layer.defer_reduces()

    def forward(self, input_ids: torch.Tensor, carry: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Final hidden states; on a stage before the last, ``(hidden, residual)`` to hand on.
        ``carry``: what the previous stage handed on (None on the first stage)."""
        x, residual = (self.embed_tokens(input_ids), None) if carry is None else carry
        for layer in self.layers[self.start:self.end]:
            x, residual = layer(x, residual)
        if self.norm is None:
            return x, residual
        return self.norm(x, residual, reduce=self.defer_reduce)[0]


class LlamaForCausalLM(ModelBase):
    supports_pp = True  # builds only its pipeline stage's part (see LlamaModel)
    lazy_weights = True  # load_weights takes loader.CheckpointTensors: each TP rank reads only its shard
    qkv_bias: Optional[bool] = None  # None: follow config.attention_bias (which also covers o_proj)
    o_bias: Optional[bool] = None
    qk_norm = False  # Qwen3: per-head q/k RMSNorm
    # (fused param, HF name, shard id)
    stacked_params = [("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
                      ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1)]

    def __init__(self, config, max_positions: Optional[int] = None):
        super().__init__()
        self.config = config
        attn_bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = attn_bias if self.qkv_bias is None else self.qkv_bias
        o_bias = attn_bias if self.o_bias is None else self.o_bias
        self.model = LlamaModel(config, max_positions or config.max_position_embeddings, qkv_bias, o_bias, self.qk_norm,
                                self.make_mlp)
        last = self.model.norm is not None
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size) if last else None
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.headless = False  # a bare backbone checkpoint without an LM head: embeddings only
        if self.tied and last and self.model.embed_tokens is not None:  # else the last stage has its own copy
            self.lm_head.weight = self.model.embed_tokens.weight

    def make_mlp(self, layer: int) -> Optional[nn.Module]:
        """Layer ``layer``'s feed-forward block; None: the dense ``LlamaMLP`` (mixture-of-experts
        models return their sparse block)."""
        return None

    def param_target(self, name: str) -> tuple[str, Any]:
        """The parameter a checkpoint tensor fills and the shard id its weight loader takes."""
        for fused, hf, sid in self.stacked_params:
            if f".{hf}." in name:
                return name.replace(f".{hf}.", f".{fused}."), sid
        return name, None

    def forward(self, input_ids: torch.Tensor, carry: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Final hidden states ``[T, hidden]`` of all tokens of the step (before the last pipeline
        stage: ``(hidden, residual)`` to hand on; ``carry`` is what the previous stage handed on)."""
        return self.model(input_ids, carry)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.headless:
            raise ValueError(f"this {type(self).__name__} checkpoint has no LM head (a bare backbone): it serves "
                             "embeddings only (is_embedding=True)")
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], complete: bool = True) -> set[str]:
        """Copy HF-named tensors into (sharded, fused) params; returns the param names filled.
        ``complete``: every param must be filled (a checkpoint); False for a partial weight update."""
        params, loaded = dict(self.named_parameters(remove_duplicate=False)), set()
        tied, bare = self.tied, False
        for name, tensor in weights:
            if name.startswith(BARE_BACKBONE):
                name, bare = "model." + name, True
            if "rotary_emb.inv_freq" in name or (tied and name == "lm_head.weight") or not self.wants_tensor(name):
                continue
            if tied and name == "model.embed_tokens.weight" and self.model.embed_tokens is None:
                name = "lm_head.weight"  # a last stage without the embedding: its own copy of the tied head
            name, shard = self.param_target(name)
            if name not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            param = params[name]
            getattr(param, "weight_loader", default_weight_loader)(param, tensor, shard)
            loaded.add(name)
        shared = tied and self.model.embed_tokens is not None
        missing = {n for n in params if n not in loaded and not (shared and n == "lm_head.weight")}
        if complete and bare and missing == {"lm_head.weight"}:  # Qwen3-Embedding-8B: untied, yet no head
            self.headless, missing = True, set()
        if missing and complete:
            raise ValueError(f"checkpoint lacks {sorted(missing)[:8]} ({len(missing)} params)")
        return loaded

    def wants_tensor(self, name: str) -> bool:
        """Whether this pipeline stage needs a checkpoint tensor; the loader reads no others."""
        if name.startswith(BARE_BACKBONE):
            name = "model." + name
        own = owns_layer_tensor(name, self.model.start, self.model.end)
        if own is not None:
            return own
        if name.startswith("model.embed_tokens."):
            return self.model.embed_tokens is not None or (self.tied and self.lm_head is not None)
        if name.startswith("model.norm."):
            return self.model.norm is not None
        if name.startswith("lm_head."):
            return self.lm_head is not None
        return True


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias, o_bias = True, False
