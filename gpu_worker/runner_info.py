"""What a model runner reports about itself (start-up phases, sizes, layout), kept apart from the
runner so its module stays about running steps."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

from treadle.gpu_worker.torchao_quant import tensor_bytes

if TYPE_CHECKING:
    from treadle.gpu_worker.model_runner import ModelRunner


def phase_clock(phases: dict[str, float]) -> Callable[[str], None]:
    """``phase(name)`` records under ``name`` the seconds since the previous call (the first: since now)."""
    mark = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        phases[name] = round(now - mark, 3)
        mark = now
    return phase


def runner_info(runner: "ModelRunner") -> dict[str, Any]:
    """The worker's start-up report and ``get_server_info``'s worker part."""
    params = list(runner.model.parameters())
    return {
        "architecture": type(runner.model).__name__,
        "dtype": str(runner.dtype).removeprefix("torch."),
        "device": str(runner.device),
        "num_params": sum(p.numel() for p in params),  # this rank's shard
        "weight_bytes": sum(tensor_bytes(p) for p in params),  # torchao's packed tensors at their size
        "kv_bytes": runner.kv_cache.nbytes if runner.kv_cache is not None else 0,
        "kv_cache_dtype": str(runner.kv_dtype).removeprefix("torch."),
        "is_encoder": runner.is_encoder,
        "pooling_mode": runner.pooling.mode,
        "normalize": runner.pooling.normalize,
        "kv_tokens": runner.cfg.kv_tokens,
        "max_slots": runner.cfg.max_slots,
        "context_len": runner.cfg.context_len,
        "vocab_size": runner.vocab_size,
        "attention_backend": runner.cfg.attention_backend,
        "tp_rank": runner.cfg.tp_rank,
        "tp_size": runner.cfg.tp_size,
        "pp_rank": runner.cfg.pp_rank,
        "pp_size": runner.cfg.pp_size,
        "kv_layers": runner.kv_cache.buf.shape[1] if runner.kv_cache is not None else 0,  # this stage's layers
        "cuda_graph_bs": runner.graphs.sizes if runner.graphs is not None else [],
        "cuda_graph_capture_time": runner.graph_capture_time,
        "startup_phases": runner.startup_phases,
        "kv_sizing": runner.kv_sizing.report() if runner.kv_sizing is not None else {},
    }
