"""Expert parallelism (``ep_size``): whole experts on the tensor-parallel ranks, tokens exchanged
all-to-all (gloo on CPU, NCCL on GPU).

``ep_size`` is 1 or ``tp_size`` (SGLang also allows divisors of ``tp_size``; not built here): rank
``r`` holds experts ``[r * E / ep, (r + 1) * E / ep)`` whole, where plain TP gives every rank a
slice of every expert. Activations reach the MoE block replicated on every rank (attention is
tensor-parallel), so rank ``r`` takes the ``r``-th slice of the step's tokens, sends each token to
the ranks that own one of its top-k experts (once per rank, with the weights of the experts
there), computes what it received on its own experts, and sends the results back. Its tokens'
outputs go into a zero ``[T, hidden]`` tensor: the sum of that over the ranks is the whole output,
so the block hands on a partial sum exactly as a row-parallel layer does, and the all-reduce the
dense model does anyway (fused into the next RMSNorm) stitches the slices together.

Every buffer has a size fixed by the number of tokens (each rank may send each peer up to its
whole slice), so the exchange has no host sync and is captured in CUDA graphs like the rest of a
decode step; unused rows carry expert -1, which the kernels skip.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from treadle.gpu_worker.distributed import pp_size, tp_rank, tp_size

_EP_SIZE = 1


def init_expert_parallel(size: int) -> None:
    """Record ``ep_size`` for the MoE layers built after this (every worker process calls it once,
    after ``distributed.init_parallel``)."""
    global _EP_SIZE
    if size not in (1, tp_size()):
        raise ValueError(f"ep_size must be 1 or tp_size ({tp_size()}), got {size}")
    if size > 1 and pp_size() > 1:
        raise ValueError("ep_size > 1 needs pp_size == 1")
    _EP_SIZE = size


def ep_size() -> int:
    return _EP_SIZE


def ep_rank() -> int:
    return tp_rank() if _EP_SIZE > 1 else 0


# compute(rows [N, hidden], weights [N, k] float32, local expert ids [N, k] (-1: none)) -> [N, hidden]
Compute = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def exchange(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, local_experts: int,
             compute: Compute) -> torch.Tensor:
    """This rank's partial sum ``[T, hidden]`` of the MoE output of the replicated tokens ``x``
    routed to global expert ``ids`` with ``weights`` (``[T, k]``): its slice of the tokens, each
    computed by the ranks that own its experts; zeros elsewhere."""
    ep, rank = _EP_SIZE, ep_rank()
    t, hidden = x.shape
    k = ids.shape[1]
    cap = -(-t // ep)  # the token slice of each rank (the last ones may be shorter)
    lo, hi = min(rank * cap, t), min((rank + 1) * cap, t)
    xs, ws, es = x[lo:hi], weights[lo:hi].float(), ids[lo:hi].long()
    n = hi - lo
    peers = torch.arange(ep, device=x.device)
    hit = (es // local_experts)[None] == peers[:, None, None]  # [ep, n, k]: expert j of token i lives on peer p
    sent = hit.any(dim=2)  # [ep, n]
    # Row of the send buffer for (peer, token): packed per peer in token order; unsent go to a spare row
    idx = torch.where(sent, peers[:, None] * cap + sent.long().cumsum(dim=1) - 1, ep * cap).view(-1)
    local_ids = torch.where(hit, es[None] - peers[:, None, None] * local_experts, -1)
    meta = torch.cat([torch.where(hit, ws[None], 0.0), local_ids.float()], dim=2).view(ep * n, 2 * k)
    send_x = x.new_zeros(ep * cap + 1, hidden).index_copy_(0, idx, xs.repeat(ep, 1))
    send_meta = torch.cat([torch.zeros(ep * cap + 1, k, device=x.device),
                           torch.full((ep * cap + 1, k), -1.0, device=x.device)], dim=1).index_copy_(0, idx, meta)
    recv_x, recv_meta = torch.empty_like(send_x[:-1]), torch.empty_like(send_meta[:-1])
    dist.all_to_all_single(recv_x, send_x[:-1])
    dist.all_to_all_single(recv_meta, send_meta[:-1])
    out = compute(recv_x, recv_meta[:, :k], recv_meta[:, k:].long())  # experts ids < 2^24: exact in float32
    back = torch.empty_like(out)
    dist.all_to_all_single(back, out.contiguous())
    back = torch.cat([back, back.new_zeros(1, hidden)])  # the spare row: what unsent pairs read
    mine = back[idx].view(ep, n, hidden).sum(dim=0)
    partial = x.new_zeros(t, hidden)
    partial[lo:hi] = mine.to(x.dtype)
    return partial
