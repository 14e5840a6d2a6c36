"""The paged KV cache: one token per location, shared by all requests.

One tensor ``[2, num_layers, num_tokens, num_kv_heads, head_dim]`` with per-layer views, so a
single allocation sizes the whole pool. Its dtype may be narrower than the model's
(``kv_cache_dtype``, e.g. FP8 e4m3 or e5m2, as SGLang stores it without scales): values are
rounded on the way in and widened by the attention kernels on the way out. The scheduler owns
the free list; the worker only writes where it is told (``out_cache_loc``) and reads through
the req-to-token table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

try:  # CUDA only: one launch for K and V instead of two index_copy kernels (and RoPE in the same one)
    from treadle.gpu_worker.layers.triton_ops import rotary_store_kv, store_kv
except ImportError:  # a CPU-only install without triton
    rotary_store_kv = store_kv = None

if TYPE_CHECKING:
    from treadle.gpu_worker.layers.rotary import RotaryEmbedding


class KVCache:
    def __init__(self, num_layers: int, num_tokens: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        # Zeroed (not empty) so that padded reads of unused locations never see NaN/inf.
        self.buf = torch.zeros(2, num_layers, num_tokens, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.num_tokens = num_tokens

    def k(self, layer: int) -> torch.Tensor:
        return self.buf[0, layer]

    def v(self, layer: int) -> torch.Tensor:
        return self.buf[1, layer]

    def store(self, layer: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.buf.is_cuda and store_kv is not None:
            store_kv(self.buf[0, layer], self.buf[1, layer], loc, k, v)
            return
        if self.buf.element_size() == 1:  # FP8: torch's CPU index_copy_ has no float8 kernel; copy the bytes
            buf = self.buf.view(torch.uint8)
            buf[0, layer].index_copy_(0, loc, k.to(self.buf.dtype).view(torch.uint8))
            buf[1, layer].index_copy_(0, loc, v.to(self.buf.dtype).view(torch.uint8))
            return
        self.buf[0, layer].index_copy_(0, loc, k.to(self.buf.dtype))
        self.buf[1, layer].index_copy_(0, loc, v.to(self.buf.dtype))

    def rotate_and_store(self, layer: int, loc: torch.Tensor, rotary: "RotaryEmbedding", positions: torch.Tensor,
                         q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """RoPE on ``q`` and ``k``, then ``k``/``v`` into the cache; returns the rotated ``q``. On CUDA
        one launch does it all (a decode step saves a launch per layer); the rotated ``k`` exists
        only in the cache."""
        if self.buf.is_cuda and rotary_store_kv is not None:  # the rotary's kernel (partial, q/k norm) does it
            return rotary.rotate_and_store_cuda(positions, q, k, v, self.buf[0, layer], self.buf[1, layer], loc)
        q_rot, k_rot = rotary(positions, q.flatten(1), k.flatten(1))
        self.store(layer, loc, k_rot.view(k.shape), v)
        return q_rot.view(q.shape)

    @property
    def nbytes(self) -> int:
        return self.buf.numel() * self.buf.element_size()


def kv_tokens_from_memory(device: torch.device, kv_dtype: torch.dtype, num_layers: int, kv_width: int,
                          mem_fraction_static: float, context_len: int, world_size: int) -> int:
    """KV pool size after the weights are loaded: what ``mem_fraction_static`` of the card
    leaves free, identical on every rank (the smallest one wins). ``kv_width``: K (or V) elements
    a token takes per layer; ``world_size``: all ranks of all pipeline stages."""
    if device.type != "cuda":
        raise ValueError("kv_tokens must be given on the CPU (there is no device memory to size from)")
    free, total = torch.cuda.mem_get_info(device)
    per_token = 2 * num_layers * kv_width * torch.empty((), dtype=kv_dtype).element_size()
    tokens = int((free - total * (1.0 - mem_fraction_static)) // per_token)
    if tokens < context_len:
        raise ValueError(f"only {max(tokens, 0)} KV-cache tokens fit in mem_fraction_static="
                         f"{mem_fraction_static}; the context needs {context_len}")
    if world_size > 1:  # every rank of every stage
        t = torch.tensor([tokens], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        tokens = int(t.item())
    return tokens
