"""``ServerArgs.resolved()``: the "auto" values that depend on the machine, decided once.

The device (CUDA when there is one), the GPU ids the ranks take, the random seed, the attention
backend, the chunk and pool sizes of a CPU engine (no device memory to size them from), the
canonical dtype names, the LoRA slot shape, the speculative-decoding defaults. The processes
after it see only resolved values; ``get_server_info`` reports them.
"""

from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING

from treadle.runtime.lora_args import device_slot_shape
from treadle.runtime.spec_args import resolve_spec_args
from treadle.runtime.torchao_args import check_torchao

if TYPE_CHECKING:
    from treadle.runtime.server_args import ServerArgs

# One dtype vocabulary: SGLang's spellings, each an alias of a canonical name (torch's) that
# ``resolve`` writes back, so the processes after it see only canonical names.
DTYPE_ALIASES = {"float": "float32", "fp32": "float32", "half": "float16", "fp16": "float16", "bf16": "bfloat16"}
CPU_KV_TOKENS = 16384  # the CPU's KV pool when max_total_tokens is not given (no device memory to size from)
CPU_CHUNKED_PREFILL = 512  # the CPU's chunked_prefill_size: bounds one step's time (see resolve)
MEM_FRACTION_STATIC = 0.85  # SGLang's default share of the card for weights + KV pool
MAX_GRAPH_BS = 256  # the largest decode batch captured in a CUDA graph by default


GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")  # NVIDIA, ROCm, WSL


def may_have_gpu() -> bool:
    """False when this machine has no GPU device file, so ``torch.cuda`` could not find one: the
    user's process then picks the CPU without importing torch (1-1.5 s of a CPU engine's start-up;
    the engine's own processes import it anyway)."""
    return any(os.path.exists(p) for p in GPU_DEVICE_FILES)


def _torch():
    import torch  # (here only: ServerArgs is built and checked without importing torch)

    return torch


def resolve(a: "ServerArgs") -> "ServerArgs":
    """Fill ``a``'s (a fresh copy's) "auto" values in place for this machine and return it."""
    if a.device is None:
        a.device = "cuda" if may_have_gpu() and _torch().cuda.is_available() else "cpu"
    cuda = a.device.startswith("cuda")
    if cuda:
        _check_gpus(a, _torch())
    check_torchao(a.torchao_config, a.device, a.dtype)
    if a.random_seed is None:
        a.random_seed = random.randint(0, 2**30)
    if a.page_size is None:
        a.page_size = 1
    if a.attention_backend is None:  # Triton kernels on the GPU; the CPU has only the reference backend
        a.attention_backend = "triton" if cuda else "torch_native"
    if a.grammar_backend is None:
        a.grammar_backend = "xgrammar"
    if a.tokenizer_path is None:
        a.tokenizer_path = a.model_path
    if a.chunked_prefill_size is None:
        # One step's prefill work: 8192 tokens are tens of ms on a GPU. A CPU core computes a token
        # of SmolLM2-135M (float32) in ~1.7 ms, so 2048 made a step ~3.5 s of one core and ~40 s
        # on a busy machine; 512 keeps it under a second of one core, and the work per token is
        # the same (one thread: 8.2 CPU-s for 4 x 1,200 tokens with 2048, 512 or 256).
        a.chunked_prefill_size = 8192 if cuda else CPU_CHUNKED_PREFILL
    if a.enable_lora is None:
        a.enable_lora = bool(a.lora_paths)
    if a.enable_lora:
        a.max_lora_rank, a.lora_target_modules = device_slot_shape(a.lora_paths, a.max_lora_rank,
                                                                   a.lora_target_modules)
    # "auto" stays (get_server_info echoes it as SGLang does; the worker reads it against the device)
    a.dtype = DTYPE_ALIASES.get(a.dtype, a.dtype)
    a.kv_cache_dtype = DTYPE_ALIASES.get(a.kv_cache_dtype, a.kv_cache_dtype)
    if a.max_running_requests is None:  # request slots: rows of the workers' req-to-token tables
        a.max_running_requests = 256 if cuda else 64
    if a.max_total_tokens is None and not cuda:  # on CUDA None: sized from free memory once the weights load
        a.max_total_tokens = CPU_KV_TOKENS
    if a.mem_fraction_static is None and not cuda:  # CUDA: None sizes the KV pool from a measured prefill
        a.mem_fraction_static = MEM_FRACTION_STATIC
    if a.cuda_graph_max_bs is None:
        a.cuda_graph_max_bs = min(a.max_running_requests, MAX_GRAPH_BS)
    resolve_spec_args(a)
    if a.pp_size > 1:  # only the last stage samples, so a placeholder decode input would not reach the first
        a.disable_overlap_schedule = a.disable_cuda_graph = True
    return a


def _check_gpus(a: "ServerArgs", torch) -> None:
    """A CUDA device must exist, and ``device="cuda"`` needs one GPU per worker rank on this node."""
    if not torch.cuda.is_available():
        raise ValueError(f"device={a.device!r} was requested but no CUDA device is available.")
    if a.device == "cuda":  # every worker rank of every DP group on this node takes its own GPU
        ranks = a.dp_size * a.tp_size * a.pp_size // a.nnodes
        last, have = a.base_gpu_id + (ranks - 1) * a.gpu_id_step, torch.cuda.device_count()
        if last >= have:
            raise ValueError(
                f"Not enough GPUs: dp_size * tp_size * pp_size / nnodes = {ranks} worker ranks need GPU ids "
                f"{a.base_gpu_id}..{last} (base_gpu_id={a.base_gpu_id}, gpu_id_step={a.gpu_id_step}), "
                f"but {have} CUDA device(s) are visible.")
