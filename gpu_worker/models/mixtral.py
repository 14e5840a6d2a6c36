"""Mixtral, and the base of every mixture-of-experts decoder: the Llama decoder whose feed-forward
blocks are ``layers/moe.py``'s ``SparseMoeBlock``.

Checkpoints hold each expert's projections as separate tensors (``experts.{e}.w1/w2/w3`` here,
``experts.{e}.gate_proj/up_proj/down_proj`` in Qwen's); ``param_target`` sends each to its slot
in the stacked ``w13``/``w2`` weights, and ``wants_tensor`` keeps the loader from reading the
experts another expert-parallel rank holds (tensor-parallel ranks read only their slice).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from treadle.gpu_worker.layers import moe_ep
from treadle.gpu_worker.layers.moe import SparseMoeBlock, expert_shard, missing_experts, moe_params
from treadle.gpu_worker.models.llama import LlamaForCausalLM


class MoeCausalLM(LlamaForCausalLM):
    """A Llama-style decoder with sparse feed-forward blocks; subclasses say how the config and
    the checkpoint name them."""

    moe_prefix = "mlp"  # the checkpoint's name of the block (Mixtral: block_sparse_moe)
    expert_names = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}

    def num_experts(self) -> int:
        raise NotImplementedError

    def param_target(self, name: str) -> tuple[str, Any]:
        name = name.replace(f".{self.moe_prefix}.", ".mlp.")
        hit = expert_shard(name, self.expert_names)
        if hit is None:
            return super().param_target(name)
        expert, part, param = hit
        return param, (expert, part)

    def wants_tensor(self, name: str) -> bool:
        hit = expert_shard(name, self.expert_names)
        if hit is not None and hit[0] // (self.num_experts() // moe_ep.ep_size()) != moe_ep.ep_rank():
            return False  # another expert-parallel rank's expert
        return super().wants_tensor(name)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], complete: bool = True) -> set[str]:
        for m in moe_params(self):
            m.loaded = 0
        loaded = super().load_weights(weights, complete)
        problem = missing_experts(self) if complete else ""
        if problem:
            raise ValueError(problem)
        return loaded


class MixtralForCausalLM(MoeCausalLM):
    moe_prefix = "block_sparse_moe"
    expert_names = {"w1": "gate", "w3": "up", "w2": "down"}

    def num_experts(self) -> int:
        return self.config.num_local_experts

    def make_mlp(self, layer: int) -> Optional[nn.Module]:
        c = self.config
        return SparseMoeBlock(c.hidden_size, c.num_local_experts, c.num_experts_per_tok, c.intermediate_size,
                              renormalize=True)
