"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention (per-head q/k RMSNorm) with
sparse feed-forward blocks; ``norm_topk_prob`` renormalises the top-k weights. Layers listed in
``mlp_only_layers``, or off the ``decoder_sparse_step`` grid, keep a dense MLP."""

from __future__ import annotations

from typing import Optional

from torch import nn

from treadle.gpu_worker.layers.moe import SparseMoeBlock
from treadle.gpu_worker.models.mixtral import MoeCausalLM


def is_sparse_layer(config, layer: int) -> bool:
    """transformers' rule for which layers of a Qwen-MoE model have experts."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return (layer not in (getattr(config, "mlp_only_layers", None) or []) and config.num_experts > 0
            and (layer + 1) % step == 0)


class Qwen3MoeForCausalLM(MoeCausalLM):
    qk_norm = True
    shared_expert = False  # Qwen2-MoE: a shared expert behind a sigmoid gate

    def num_experts(self) -> int:
        return self.config.num_experts

    def make_mlp(self, layer: int) -> Optional[nn.Module]:
        c = self.config
        if not is_sparse_layer(c, layer):
            return None
        shared = c.shared_expert_intermediate_size if self.shared_expert else 0
        return SparseMoeBlock(c.hidden_size, c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size,
                              bool(getattr(c, "norm_topk_prob", False)), shared)
