"""ServerArgs: every engine argument, with SGLang's names and defaults (API.md section 10).

Unknown arguments raise ``TypeError`` (dataclass init); out-of-range values raise ``ValueError``
at construction, so a typo never reaches a child process. ``resolved()`` fills the "auto"
values that depend on the machine (device, dtype, memory sizes: ``resolve_args.py``). SGLang's fields that Treadle
does not implement come from ``SGLangOnlyArgs`` (runtime/sglang_compat.py): accepted with no
effect, or refused by ``check_supported()`` unless left at SGLang's default. The checks of a
group of fields live beside it: ``parallel_args.py``, ``lora_args.py``, ``spec_args.py``,
``torchao_args.py``; the shared ones (``check_int``...) in ``arg_checks.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Optional, Union

from treadle.runtime.arg_checks import check_choice, check_int, check_num
from treadle.runtime.config_overrides import parse_overrides
from treadle.runtime.lora_args import check_lora_args
from treadle.runtime.parallel_args import check_parallel_args
from treadle.runtime.pdmux_args import check_pdmux_args
from treadle.runtime.resolve_args import DTYPE_ALIASES, resolve
from treadle.runtime.spec_args import check_spec_args, spec_refusals
from treadle.runtime.sglang_compat import SGLangOnlyArgs, refused_settings
from treadle.runtime.sglang_no_effect import check_no_effect_values
from treadle.runtime.torchao_args import parse_torchao_config

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DTYPES = ("auto", "float32", "float16", "bfloat16", *DTYPE_ALIASES)
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy", "pt")
ATTENTION_BACKENDS = (None, "torch_native", "triton", "flashinfer")  # flashinfer: refused by check_supported
GEMV_BACKENDS = (None, "triton", "cublas")
SCHEDULE_POLICIES = ("fcfs", "lpm", "random", "dfs-weight", "lof", "priority")
TOKENIZER_MODES = ("auto", "slow")
GRAMMAR_BACKENDS = (None, "xgrammar", "none")
KV_CACHE_DTYPES = ("auto", "fp8_e5m2", "fp8_e4m3", "bfloat16", "float16", "float32", *DTYPE_ALIASES)
QUANTIZATIONS = (None, "awq", "fp8", "gptq", "gguf", "marlin", "awq_marlin", "gptq_marlin", "bitsandbytes", "w8a8_int8", "w8a8_fp8")
DEVICES = (None, "cpu", "cuda")


@dataclass
class ServerArgs(SGLangOnlyArgs):
    # Model and tokenizer
    model_path: str = "default"
    tokenizer_path: Optional[str] = None
    tokenizer_mode: str = "auto"
    skip_tokenizer_init: bool = False
    load_format: str = "auto"
    trust_remote_code: bool = False
    context_length: Optional[int] = None
    is_embedding: bool = False
    revision: Optional[str] = None  # a hub id's branch, tag or commit (runtime/hub.py)
    download_dir: Optional[str] = None  # the hub cache for hub ids (default: HF_HUB_CACHE / HF_HOME)
    json_model_override_args: Union[str, dict] = "{}"  # merged into config.json (runtime/config_overrides.py)
    dtype: str = "auto"
    quantization: Optional[str] = None
    torchao_config: str = ""  # SGLang's: "int8wo", "int4wo-<group>", "fp8wo", "fp8dq-per_tensor", "fp8dq-per_row"
    kv_cache_dtype: str = "auto"
    device: Optional[str] = None
    served_model_name: Optional[str] = None
    # Memory and scheduling
    mem_fraction_static: Optional[float] = None
    max_total_tokens: Optional[int] = None
    max_running_requests: Optional[int] = None
    max_queued_requests: Optional[int] = None
    max_prefill_tokens: int = 16384
    chunked_prefill_size: Optional[int] = None
    page_size: Optional[int] = None
    schedule_policy: str = "fcfs"
    schedule_conservativeness: float = 1.0
    enable_priority_scheduling: bool = False
    cpu_offload_gb: int = 0
    # Parallelism
    tp_size: int = 1
    dp_size: int = 1
    pp_size: int = 1
    # Mixture-of-experts models: whole experts placed on the TP ranks, tokens exchanged all-to-all
    # (1: every rank holds a TP shard of every expert). 1 or tp_size (docs/moe.md).
    ep_size: int = 1
    base_gpu_id: int = 0
    gpu_id_step: int = 1
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: Optional[str] = None
    # Performance
    attention_backend: Optional[str] = None
    sampling_backend: Optional[str] = None
    grammar_backend: Optional[str] = None
    cuda_graph_max_bs: Optional[int] = None
    disable_cuda_graph: bool = False
    disable_radix_cache: bool = False
    disable_overlap_schedule: bool = False
    disable_custom_all_reduce: bool = False
    # TP on one machine: the all-reduce before each RMSNorm, the residual add and the norm in one
    # kernel (on by default: measured faster on two H200s; False keeps the one-shot all-reduce alone)
    enable_allreduce_fusion: bool = True
    # Treadle's own: one-token products (batch-1 decode) by the Triton GEMV launched with PDL
    # ("triton"), or by cuBLAS ("cublas"); None: "triton" where PDL exists (Hopper or later)
    gemv_backend: Optional[str] = None
    # The same request gives the same tokens and logprobs whatever else is in its batch and however
    # its prompt was chunked or cached: batch-invariant matmuls, attention and sampling (docs/deterministic.md)
    enable_deterministic_inference: bool = False
    # PD multiplexing (runtime/pdmux_args.py): a step's decode and prefill rows run as two nano-batches
    # at once; beside decode rows a step prefills at most pdmux_prefill_tokens; pdmux_decode_sms > 0
    # runs the decode half on a CUDA green context of that many SMs (0: a high-priority stream)
    enable_pdmux: bool = False
    pdmux_prefill_tokens: int = 2048
    pdmux_decode_sms: int = 0
    enable_mixed_chunk: bool = False
    stream_interval: int = 1
    incremental_streaming_output: bool = True
    random_seed: Optional[int] = None
    # Features
    allow_auto_truncate: bool = False
    enable_streaming_session: bool = False
    enable_lora: Optional[bool] = None
    lora_paths: Optional[list] = None
    max_loras_per_batch: int = 8
    max_loaded_loras: Optional[int] = None
    max_lora_rank: Optional[int] = None
    lora_target_modules: Optional[list] = None
    lora_backend: str = "csgmv"
    lora_eviction_policy: str = "lru"
    enable_custom_logit_processor: bool = False
    enable_return_hidden_states: bool = False
    preferred_sampling_params: Optional[str] = None
    # Speculative decoding (runtime/spec_args.py, docs/speculative.md)
    speculative_algorithm: Optional[str] = None
    speculative_draft_model_path: Optional[str] = None
    speculative_num_steps: Optional[int] = None
    speculative_eagle_topk: Optional[int] = None
    speculative_num_draft_tokens: Optional[int] = None
    speculative_ngram_min_match_window_size: int = 1
    speculative_ngram_max_match_window_size: int = 12
    # Logging and supervision
    log_level: str = "error"
    log_requests: bool = False
    log_requests_level: int = 2
    show_time_cost: bool = False
    enable_metrics: bool = False
    watchdog_timeout: float = 300.0
    weight_version: str = "default"

    def __post_init__(self) -> None:
        self._check()

    # -------------------------------------------------------------- validation
    def _check(self) -> None:
        if not isinstance(self.model_path, str) or not self.model_path:
            raise ValueError(f"model_path must be a non-empty string, got {self.model_path!r}.")
        for name in ("tokenizer_path", "revision", "download_dir"):
            if getattr(self, name) is not None and not (isinstance(getattr(self, name), str) and getattr(self, name)):
                raise ValueError(f"{name} must be a non-empty string or None, got {getattr(self, name)!r}.")
        parse_overrides(self.json_model_override_args)
        check_choice("log_level", self.log_level, LOG_LEVELS)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("load_format", self.load_format, LOAD_FORMATS)
        check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        check_choice("gemv_backend", self.gemv_backend, GEMV_BACKENDS)
        check_choice("schedule_policy", self.schedule_policy, SCHEDULE_POLICIES)
        check_choice("tokenizer_mode", self.tokenizer_mode, TOKENIZER_MODES)
        check_choice("grammar_backend", self.grammar_backend, GRAMMAR_BACKENDS)
        check_choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        check_choice("quantization", self.quantization, QUANTIZATIONS)
        if parse_torchao_config(self.torchao_config):
            if self.quantization not in (None, "gguf"):
                raise ValueError(f"torchao_config={self.torchao_config!r} quantizes float weights; it cannot be "
                                 f"combined with quantization={self.quantization!r}.")
            if self.enable_deterministic_inference:
                raise ValueError(f"torchao_config={self.torchao_config!r} cannot be combined with "
                                 "enable_deterministic_inference=True: torchao's kernels choose their reduction order "
                                 "by batch size. Quantized checkpoints (AWQ, GPTQ, FP8) work in the mode.")
        if self.device is not None and not (self.device in DEVICES or str(self.device).startswith("cuda:")):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}.")
        check_parallel_args(self)
        check_int("stream_interval", self.stream_interval, lo=1)
        check_int("context_length", self.context_length, lo=2, optional=True)
        check_int("max_total_tokens", self.max_total_tokens, lo=16, optional=True)
        check_int("max_running_requests", self.max_running_requests, lo=1, optional=True)
        check_int("max_queued_requests", self.max_queued_requests, lo=1, optional=True)
        check_int("max_prefill_tokens", self.max_prefill_tokens, lo=1)
        check_int("page_size", self.page_size, lo=1, optional=True)
        check_int("cuda_graph_max_bs", self.cuda_graph_max_bs, lo=1, optional=True)
        check_int("random_seed", self.random_seed, lo=0, optional=True)
        check_int("log_requests_level", self.log_requests_level, lo=0, hi=3)
        if self.chunked_prefill_size is not None:
            check_int("chunked_prefill_size", self.chunked_prefill_size)
            if self.chunked_prefill_size < 1 and self.chunked_prefill_size != -1:
                raise ValueError(f"chunked_prefill_size must be -1 (off) or at least 1, got {self.chunked_prefill_size}.")
        if self.mem_fraction_static is not None:
            check_num("mem_fraction_static", self.mem_fraction_static)
            if not 0.0 < self.mem_fraction_static < 1.0:
                raise ValueError(f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}.")
        check_num("schedule_conservativeness", self.schedule_conservativeness)
        if self.schedule_conservativeness <= 0:
            raise ValueError("schedule_conservativeness must be positive.")
        check_num("watchdog_timeout", self.watchdog_timeout)
        if not 0 < self.watchdog_timeout < float("inf"):
            raise ValueError(f"watchdog_timeout must be a positive number of seconds, got {self.watchdog_timeout}.")
        if self.preferred_sampling_params is not None:
            try:
                if not isinstance(json.loads(self.preferred_sampling_params), dict):
                    raise ValueError
            except (TypeError, ValueError):
                raise ValueError("preferred_sampling_params must be a JSON object string.") from None
        check_lora_args(self)
        check_spec_args(self)
        check_pdmux_args(self)
        check_no_effect_values(self)

    # -------------------------------------------------------------- resolution
    def resolved(self) -> "ServerArgs":
        """A copy with the machine-dependent "auto" values filled in (``resolve_args.py``)."""
        return resolve(dataclasses.replace(self))

    def check_supported(self) -> None:
        """Refuse valid settings whose feature is not built yet, instead of silently ignoring them."""
        missing = {
            "quantization": self.quantization not in (None, "gguf", "awq", "awq_marlin", "gptq", "gptq_marlin", "fp8"),
            "dp_size": self.dp_size > 1 and self.nnodes > 1,  # DP groups on one node only
            "cpu_offload_gb": self.cpu_offload_gb > 0,
            "attention_backend": self.attention_backend == "flashinfer",  # no FlashInfer backend: triton serves
        }
        shown = [f"{k}={getattr(self, k)!r}" for k, bad in missing.items() if bad] + refused_settings(self)
        shown += spec_refusals(self)
        if shown:
            shown_all = ", ".join(shown)
            raise NotImplementedError(f"Not supported yet by Treadle: {shown_all} (see the README's feature table).")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "ServerArgs":
        return cls(**json.loads(text))

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}


def default_cache_dir() -> str:
    return os.environ.get("TREADLE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "treadle")
