"""KV pool size from a measured activation peak (CUDA, when ``mem_fraction_static`` is not given).

SGLang's ``mem_fraction_static`` is the share of the card that weights and KV pool take; the rest
is left for activations, CUDA graphs and the sampler. A fixed default (0.85) leaves 12 GB of an
80 GB card for what a Llama-3.1-8B prefill of 8,192 tokens needs a fraction of. As vLLM and
SGLang's memory profiling do, the worker measures instead: with the weights loaded it runs one
prefill of the largest step the scheduler plans (``prefill_tokens``) over a provisional pool just
big enough for it, reads ``torch.cuda.max_memory_allocated`` around that forward, frees the pool,
and gives the KV pool what is free minus ``reserve_bytes``. The effective ``mem_fraction_static``
(weights + pool over the card) is reported, so the number means what it means in SGLang. An
explicit ``mem_fraction_static`` keeps SGLang's rule (``kv_cache.kv_tokens_from_memory``).
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch

from treadle.gpu_worker.kv_cache import KVCache, kv_tokens_from_memory
from treadle.runtime.resolve_args import MEM_FRACTION_STATIC

if TYPE_CHECKING:
    from treadle.gpu_worker.model_runner import ModelRunner

logger = logging.getLogger("treadle.worker")
GIB = 1 << 30
MARGIN_MIN_BYTES = GIB  # cuBLAS/NCCL workspaces, Triton scratch, allocator fragmentation: never less than this
MARGIN_FRACTION = 0.05  # ... nor less than this share of the card
SAMPLER_COPIES = 4  # float32 [rows, vocab] tensors a full sampling batch holds at once (logits, probs, sorted, keys)


@dataclass
class KvSizing:
    """What sized the pool (bytes), for the log and ``get_server_info``."""

    tokens: int
    activation_peak: int
    reserve: int
    mem_fraction_static: float

    def report(self) -> dict[str, float]:
        return {"kv_tokens": self.tokens, "activation_peak_gb": round(self.activation_peak / 1e9, 3),
                "reserve_gb": round(self.reserve / 1e9, 3), "mem_fraction_static": round(self.mem_fraction_static, 4)}


def reserve_bytes(total: int, activation_peak: int, prefill_tokens: int, graph_bs: int, max_slots: int,
                  vocab: int) -> int:
    """Device memory kept out of the KV pool: the measured prefill peak; the decode CUDA graphs'
    private pool (activations of their largest batch, scaled from the prefill's per-token peak;
    captured after the pool is allocated, so not measurable before it); a full batch's sampling
    tensors; and a margin of ``max(1 GiB, 5%)`` of the card."""
    per_token = activation_peak / max(1, prefill_tokens)
    graphs = int(per_token * graph_bs)
    sampling = max_slots * vocab * 4 * SAMPLER_COPIES
    return activation_peak + graphs + sampling + max(MARGIN_MIN_BYTES, int(MARGIN_FRACTION * total))


def kv_tokens_from_peak(free: int, total: int, per_token_bytes: int, reserve: int, context_len: int) -> tuple[int, float]:
    """``(tokens, mem_fraction_static)``: the pool takes what is free minus ``reserve``; the
    fraction is what weights, pool and everything allocated before take of ``total``."""
    tokens = int((free - reserve) // per_token_bytes)
    if tokens < context_len:
        raise ValueError(f"only {max(tokens, 0)} KV-cache tokens fit beside the measured activations "
                         f"({reserve / 1e9:.2f} GB kept free of {free / 1e9:.2f} GB); the context needs "
                         f"{context_len}: give a smaller context_length or chunked_prefill_size, or mem_fraction_static")
    return tokens, (total - free + tokens * per_token_bytes) / total


def measure_peak(run: Callable[[], None], device: torch.device) -> int:
    """Bytes ``run`` allocated at its peak beyond what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def profile_kv_pool(runner: "ModelRunner", num_layers: int, num_kv_heads: int, head_dim: int,
                    measure: Callable[[Callable[[], None], torch.device], int] = measure_peak,
                    mem_info: Callable[[torch.device], tuple[int, int]] = torch.cuda.mem_get_info) -> KvSizing:
    """Run the profiling prefill on a provisional pool and size the real one; leaves
    ``runner.kv_cache`` None and ``runner.cfg.kv_tokens`` at the new size (the caller allocates).
    Every rank measures; the smallest pool wins. ``measure``/``mem_info`` are the device
    boundary (a CPU test fakes them)."""
    from treadle.gpu_worker.warmup import warm_up

    cfg = runner.cfg
    n = max(1, min(cfg.prefill_tokens or cfg.context_len, cfg.context_len - 1))
    cfg.kv_tokens = n + 1  # the warm-up's prefill plus its decode step
    runner.kv_cache = KVCache(num_layers, n + 2, num_kv_heads, head_dim, runner.kv_dtype, runner.device)
    peak = measure(lambda: warm_up(runner, [n]), runner.device)
    runner.kv_cache = None
    gc.collect()
    if runner.device.type == "cuda":
        torch.cuda.empty_cache()
    free, total = mem_info(runner.device)
    per_token = 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=runner.kv_dtype).element_size()
    reserve = reserve_bytes(total, peak, n, cfg.cuda_graph_max_bs, cfg.max_slots, runner.vocab_size)
    tokens, _ = kv_tokens_from_peak(free, total, per_token, reserve, cfg.context_len)
    if cfg.tp_size * cfg.pp_size > 1:  # every rank of every stage holds the same pool
        t = torch.tensor([tokens], device=runner.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        tokens = int(t.item())
    cfg.kv_tokens = tokens
    return KvSizing(tokens, peak, reserve, (total - free + tokens * per_token) / total)


def size_kv_pool(runner: "ModelRunner", attn: list) -> Optional[KvSizing]:
    """Set ``runner.cfg.kv_tokens`` when it is not given: from a measured prefill (CUDA, no
    ``mem_fraction_static``, no draft model: its pool takes the fixed share), else from
    ``mem_fraction_static`` (SGLang's rule). ``attn``: the model's attention layers."""
    from treadle.gpu_worker.warmup import should_warm_up

    cfg, draft = runner.cfg, runner.draft
    width = attn[0].num_kv_heads * attn[0].head_dim  # a draft model's pool takes the same tokens
    layers = len(attn) + (draft.kv_layers_like(width) if draft is not None else 0)
    if (cfg.kv_tokens <= 0 and cfg.mem_fraction_static is None and runner.device.type == "cuda"
            and draft is None and should_warm_up(runner, with_cache=False)):
        sizing = profile_kv_pool(runner, len(attn), attn[0].num_kv_heads, attn[0].head_dim)
        logger.info("KV pool sized from a measured prefill of %d tokens: %s", cfg.prefill_tokens, sizing.report())
        return sizing
    if cfg.kv_tokens <= 0:
        cfg.kv_tokens = kv_tokens_from_memory(runner.device, runner.kv_dtype, layers, width,
                                              cfg.mem_fraction_static or MEM_FRACTION_STATIC,
                                              cfg.context_len, cfg.tp_size * cfg.pp_size)
    return None
