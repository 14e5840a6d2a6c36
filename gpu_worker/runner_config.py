"""What a ``ModelRunner`` is built with: the checkpoint, device and dtypes, table sizes, parallel
layout and optional features. ``gpu_worker.main`` fills it from the server arguments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class RunnerConfig:
    model_dir: str  # HF-format directory: config.json + *.safetensors
    load_format: str = "auto"  # "auto"/"safetensors": read weights; "dummy": seeded random weights
    # "awq"/"gptq" with dummy weights: random 4-bit ones (else read from the checkpoint); "fp8" on a
    # float checkpoint: FP8 weights quantized at load (fp8.py)
    quantization: Optional[str] = None
    dtype: str = "auto"  # "auto" = float32 on CPU, bfloat16 on CUDA
    device: str = "cpu"  # "cpu", "cuda", "cuda:N"
    kv_tokens: int = 4096  # KV-cache capacity in tokens
    max_slots: int = 64  # rows of the req-to-token table (max running requests)
    context_len: int = 2048  # columns of the req-to-token table (max positions per request)
    attention_backend: str = "torch_native"
    random_seed: int = 0
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    ep_size: int = 1  # mixture-of-experts models: 1 (experts TP-sliced) or tp_size (whole experts per rank)
    cuda_graph_max_bs: int = 0  # > 0: capture decode CUDA graphs up to this batch size (CUDA only)
    # With kv_tokens <= 0 (CUDA): the KV pool is sized from free device memory, weights + pool taking
    # this share of the card (SGLang's meaning); None: whatever a measured prefill's peak leaves (kv_sizing.py)
    mem_fraction_static: Optional[float] = 0.85
    prefill_tokens: int = 0  # the largest prefill step (the scheduler's budget): warm-up and memory profile
    custom_all_reduce: bool = False  # TP ranks on one machine: small all-reduces over symmetric memory
    allreduce_fusion: bool = False  # and the reduce before each RMSNorm inside the norm's kernel
    gemv_backend: Optional[str] = None  # one-token products: "triton", "cublas"; None: triton where PDL exists
    kv_cache_dtype: str = "auto"  # "auto" (the model's), "fp8_e4m3", "fp8_e5m2", "bfloat16", ...
    lora_slots: int = 0  # > 0: LoRA adapters, this many on the device at once (max_loras_per_batch)
    lora_rank: int = 0  # the device slots' rank (max_lora_rank)
    lora_targets: Optional[tuple[str, ...]] = None  # the projections with device slots (None: all)
    torchao_config: str = ""  # SGLang's torchao_config ("int8wo", "fp8dq-per_row", ...): torchao_quant.py
    draft_model_dir: Optional[str] = None  # speculative_algorithm="STANDALONE": the draft model (spec_draft.py)
    spec_algorithm: Optional[str] = None  # "EAGLE" / "EAGLE3": draft_model_dir is a draft head (spec_eagle.py)
    spec_topk: int = 1  # EAGLE: tokens each expanded draft node offers (1: a chain)
    spec_steps: int = 0  # EAGLE: draft levels per verify
    deterministic: bool = False  # enable_deterministic_inference: batch-invariant kernels (batch_invariant.py)
    pdmux: bool = False  # enable_pdmux: a mixed step's decode and prefill rows as two nano-batches (pdmux.py)
    pdmux_decode_sms: int = 0  # > 0: the decode nano-batch on a green context of this many SMs (CUDA)
