"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2's attention (q/k/v bias) with sparse
blocks that also run a shared expert, scaled per token by ``sigmoid(shared_expert_gate(x))``."""

from __future__ import annotations

from treadle.gpu_worker.models.qwen3_moe import Qwen3MoeForCausalLM


class Qwen2MoeForCausalLM(Qwen3MoeForCausalLM):
    qk_norm = False
    qkv_bias, o_bias = True, False
    shared_expert = True
