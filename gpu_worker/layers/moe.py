"""Mixture-of-experts feed-forward: a softmax top-k router and SiLU-gated experts held as stacked
weights, plus an optional shared expert (Qwen2-MoE's, behind a sigmoid gate).

Experts are ``w13 [E, 2 * I, hidden]`` (gate rows, then up rows) and ``w2 [E, hidden, I]``,
filled from the per-expert checkpoint tensors at load (``weight_loader``). Parallelism:

* tensor parallel (``ep_size`` 1): every rank holds every expert, sliced along ``I`` as a dense
  MLP is (gate/up by rows, down by columns), so each rank's output is a partial sum;
* expert parallel (``ep_size == tp_size``, ``moe_ep.py``): each rank holds ``E / ep`` whole
  experts and tokens travel to them all-to-all; the output is again a partial sum.

Either way the block hands its partial sum to the decoder's usual all-reduce (deferred into the
next RMSNorm, as a row-parallel layer's is). The experts run as one fused Triton MoE on CUDA
(``triton_moe.py``) and as a per-expert loop in torch elsewhere: the CPU path and the reference
the kernel is tested against.

With ``enable_deterministic_inference`` (CPU) the torch path is batch-invariant: the router's
softmax and each expert's products take ``batch_invariant``'s fixed-shape ops, the top-k weights
are renormalized by an explicit left-to-right sum, the shared expert's gate is ``batch_invariant.sigmoid``
(torch's ``sigmoid``, like its ``silu``, computes a size-dependent tail on another code path), and a
token's expert outputs are added to its row in ascending expert order, one ``index_add_`` per
expert. The fused CUDA kernels pick their tiles by the token count: the mode refuses MoE models on
CUDA and expert parallelism (``runtime/model_check.py``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from treadle.gpu_worker.distributed import all_reduce, tp_rank, tp_size
from treadle.gpu_worker.layers import batch_invariant, moe_ep
from treadle.gpu_worker.layers.activation import SiluAndMul
from treadle.gpu_worker.layers.linear import MergedColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from treadle.gpu_worker.layers.triton_gemv import project

try:  # the fused kernels for CUDA tensors; CPU-only installs take the torch path
    from treadle.gpu_worker.layers import triton_moe, triton_moe_route
except ImportError:
    triton_moe = triton_moe_route = None

EXPERT_SHARDS = ("gate", "up", "down")


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [T, k] float32, expert ids [T, k])``: softmax over the experts (in float32, as
    transformers does), the ``top_k`` largest; ``renormalize``: scaled to sum to 1 (Mixtral always,
    Qwen-MoE with ``norm_topk_prob``)."""
    if not batch_invariant.ENABLED:
        weights, ids = torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1)
        return (weights / weights.sum(dim=-1, keepdim=True) if renormalize else weights), ids
    weights, ids = torch.topk(batch_invariant.softmax(logits.float()), top_k, dim=-1)
    if renormalize:  # a row's k weights summed left to right, whatever the batch
        total = weights[:, 0]
        for j in range(1, top_k):
            total = total + weights[:, j]
        weights = weights / total[:, None]
    return weights, ids


def _expert(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert's SiLU-gated MLP of rows ``x``; in the deterministic mode with fixed-shape ops."""
    if batch_invariant.ENABLED:
        return batch_invariant.linear(batch_invariant.silu_and_mul(batch_invariant.linear(x, w13)), w2)
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


def moe_torch(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor) -> torch.Tensor:
    """``sum_j weights[t, j] * expert_{ids[t, j]}(x[t])`` for every token, expert by expert in
    ascending order (transformers' order); ids outside ``[0, E)`` (another rank's) count nothing."""
    out = torch.zeros_like(x)
    num_experts, k = w13.shape[0], ids.shape[1]
    flat = ids.reshape(-1)
    valid = (flat >= 0) & (flat < num_experts)
    order = torch.argsort(torch.where(valid, flat, num_experts), stable=True)
    counts = torch.bincount(flat[valid], minlength=num_experts).tolist()
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start:start + count]
        start += count
        tokens = pairs // k
        y = _expert(x[tokens], w13[e], w2[e]) * weights.reshape(-1)[pairs, None]
        out.index_add_(0, tokens, y.to(out.dtype))
    return out


class FusedMoE(nn.Module):
    """The routed experts of one layer: this rank's stacked weights and the computation over them."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        ep = moe_ep.ep_size()
        if num_experts % ep:
            raise ValueError(f"num_experts {num_experts} not divisible by ep_size {ep}")
        self.slices = tp_size() if ep == 1 else 1  # TP slices each expert; EP places whole ones
        if intermediate % self.slices:
            raise ValueError(f"expert intermediate size {intermediate} not divisible by tp_size {self.slices}")
        self.num_experts, self.local_experts = num_experts, num_experts // ep
        self.expert_start = moe_ep.ep_rank() * self.local_experts
        self.inter = intermediate // self.slices
        # each checkpoint tensor's whole shape, checked before this rank's slice of it is read
        self.full_shapes = {"gate": (intermediate, hidden), "up": (intermediate, hidden), "down": (hidden, intermediate)}
        self.w13_weight = nn.Parameter(torch.empty(self.local_experts, 2 * self.inter, hidden), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(self.local_experts, hidden, self.inter), requires_grad=False)
        self.w13_weight.weight_loader = self.w2_weight.weight_loader = self.weight_loader
        self.loaded = 0  # per-expert tensors filled; load_weights checks that every one came

    def owns(self, expert: int) -> bool:
        return self.expert_start <= expert < self.expert_start + self.local_experts

    def weight_loader(self, param: nn.Parameter, full, shard: tuple[int, str]) -> None:
        """Fill expert ``shard[0]`` (a global index this rank owns)'s ``shard[1]`` (gate, up or
        down) from its full checkpoint tensor, reading only this rank's slice."""
        expert, part = shard
        if not self.owns(expert) or part not in EXPERT_SHARDS:
            raise ValueError(f"expert tensor {shard} does not belong to this rank's experts")
        if tuple(full.shape) != self.full_shapes[part]:
            raise ValueError(f"expert {expert} {part}: checkpoint shape {tuple(full.shape)}, "
                             f"the model's {self.full_shapes[part]}")
        rank = tp_rank() if self.slices > 1 else 0
        dest = param.data[expert - self.expert_start]
        if part == "down":
            dest.copy_(full.narrow(1, rank * self.inter, self.inter))
        else:
            dest.narrow(0, 0 if part == "gate" else self.inter, self.inter).copy_(full.narrow(0, rank * self.inter,
                                                                                              self.inter))
        self.loaded += 1

    def compute(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The weighted expert sum of each row over this rank's experts (``ids`` local; -1: none)."""
        if x.is_cuda and triton_moe is not None:
            return triton_moe.fused_moe(x, self.w13_weight, self.w2_weight, weights, ids)
        return moe_torch(x, self.w13_weight, self.w2_weight, weights, ids)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum of the output for tokens ``x`` routed to global expert ``ids``."""
        if moe_ep.ep_size() > 1:
            return moe_ep.exchange(x, weights, ids, self.local_experts, self.compute)
        return self.compute(x, weights, ids)


class PartialRowLinear(RowParallelLinear):
    """A row-parallel projection whose partial sum is added to others before the reduce (the
    shared expert's down projection): never reduced here, never pushed to the peers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(x, self.weight, None, self.gemv_config)


class SharedExpert(nn.Module):
    """A dense SiLU-gated MLP that every token takes besides its routed experts (TP-sliced)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate, intermediate])
        self.down_proj = PartialRowLinear(intermediate, hidden)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class SparseMoeBlock(nn.Module):
    """Router + experts (+ shared expert): the feed-forward block of a MoE decoder layer.

    ``reduce_results`` False: forward returns this rank's partial sum, which the next RMSNorm
    all-reduces (``LlamaDecoderLayer.defer_reduces``)."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, intermediate: int, renormalize: bool,
                 shared_intermediate: int = 0):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok {top_k} must be in [1, num_experts={num_experts}]")
        self.top_k, self.renormalize = top_k, renormalize
        self.gate = ReplicatedLinear(hidden, num_experts, bias=False)
        self.experts = FusedMoE(num_experts, hidden, intermediate)
        self.shared_expert: Optional[SharedExpert] = None
        self.shared_expert_gate: Optional[nn.Module] = None
        if shared_intermediate:
            self.shared_expert = SharedExpert(hidden, shared_intermediate)
            self.shared_expert_gate = ReplicatedLinear(hidden, 1, bias=False)
        self.reduce_results = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        if logits.is_cuda and triton_moe_route is not None:
            weights, ids = triton_moe_route.fused_route(logits, self.top_k, self.renormalize)
        else:
            weights, ids = route(logits, self.top_k, self.renormalize)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None:  # the sigmoid gate is the same on every rank: it scales the partial sums
            g = self.shared_expert_gate(x)
            g = batch_invariant.sigmoid(g) if batch_invariant.ENABLED else torch.sigmoid(g)
            out = out + g * self.shared_expert(x)
        return all_reduce(out) if self.reduce_results else out


def expert_shard(name: str, names: dict[str, str]) -> Optional[tuple[int, str, str]]:
    """``(expert, shard, param name)`` of a per-expert checkpoint tensor ``...experts.{e}.{hf}.weight``
    where ``names`` maps the checkpoint's projection names to gate/up/down; None for other names."""
    head, sep, tail = name.partition(".experts.")
    parts = tail.split(".")
    if not sep or len(parts) != 3 or not parts[0].isdigit() or parts[1] not in names or parts[2] != "weight":
        return None
    part = names[parts[1]]
    return int(parts[0]), part, f"{head}.experts.{'w2' if part == 'down' else 'w13'}_weight"


def moe_params(module: nn.Module) -> list[FusedMoE]:
    return [m for m in module.modules() if isinstance(m, FusedMoE)]


def missing_experts(model: nn.Module) -> str:
    """Why the load that just ran left some expert of this rank unfilled ("" if none)."""
    for m in moe_params(model):
        if m.loaded < 3 * m.local_experts:
            return f"checkpoint lacks {3 * m.local_experts - m.loaded} per-expert tensors of this rank's experts"
    return ""
