"""SGLang's other ``ServerArgs`` fields: accepted with no effect, or refused unless left at SGLang's default.

Code written for SGLang passes its own arguments (``port``, ``enable_torch_compile``,
``cuda_graph_bs``, ...) and often passes defaults explicitly; a ``TypeError`` there would make
that code fail for names that do not matter here. So every field of SGLang's ``ServerArgs``
(commit 001067ff, the version API.md cites, plus the names of late-2025 releases that it renamed
or dropped) that Treadle does not implement is a field of ``SGLangOnlyArgs``, with SGLang's
default, and so of ``ServerArgs`` (SGLang's one private field, its bookkeeping
``_speculative_draft_quantization_explicitly_set``, is left out). Each is in one of two tables:

* ``NO_EFFECT`` (``sglang_no_effect.py``, with the check that its values can reach the child
  processes): knobs that change speed, memory use or deployment but not results (kernels,
  CUDA graphs, caches, scheduling tweaks, the HTTP server Treadle does not have), and knobs that
  only act on model kinds Treadle does not serve (Mamba, DeepSeek sparse attention) or tune MoE kernels
  and DeepEP. Lossy
  speed-ups (TF32, INT8 all-reduce) are here too: without them results are exact, not wrong.
* ``REFUSED``: features not built, whose silent absence would change results or break a promise
  (decoupled speculative decoding, DeepEP/elastic expert parallelism, context parallelism, template names, dumps). Their
  defaults pass; another value makes ``ServerArgs.check_supported()`` raise
  ``NotImplementedError`` naming the argument and why, before any child process starts.

Unknown names still raise ``TypeError``. The fields are keyword-only (``ServerArgs("path")``
keeps meaning ``model_path``) and left out of ``repr``; they travel to the child processes with
the rest (``to_dict``) and ``get_server_info`` echoes them, as SGLang's does. The README's
lists of both tables are checked against them by tests/unit/test_server_args.py.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from treadle.runtime.sglang_no_effect import NO_EFFECT

# ------------------------------------------------------------------ refused unless at SGLang's default
SPEC, CP = "decoupled speculative decoding is not built yet", "context parallelism is not built yet"
EP = "expert parallelism beyond ep_size (DeepEP, elastic EP) is not built"
CHAT = "this chat-template or parser option is not built (treadle serve reads chat_template and the parsers)"
PD, EPD = "PD disaggregation is not built yet", "encoder disaggregation is not built yet"
PRIORITY = "priority scheduling is fixed: higher values first, preemption at a gap of 10"
DUMP, WEIGHTS, MIS = ("this debug output is not built yet", "weight updates are not built yet",
                      "multi-item scoring is not built yet")
MODELOPT, DECRYPT, KTRANSFORMERS = ("ModelOpt quantization is not built", "checkpoint decryption is not built",
                                    "KTransformers CPU experts are not built")
IMAGE_PROC, INVARIANT = "the image processor is the one Transformers picks", "matching a trainer's kernels (true on-policy RL) is not built; enable_deterministic_inference is"

REFUSED: dict[str, tuple[Any, str]] = {  # name: (SGLang's default, why another value is refused)
    "enable_multimodal": (None, "multimodal input follows the model: LLaVA always takes it"),
    "model_config_parser": ("auto", "config.json is always read (Hugging Face format)"),
    "quantization_param_path": (None, "KV-cache scaling factors are not loaded"),
    "enable_fp32_lm_head": (False, "the LM head runs in the model dtype"),
    "modelopt_quant": (None, MODELOPT), "modelopt_checkpoint_restore_path": (None, MODELOPT),
    "modelopt_checkpoint_save_path": (None, MODELOPT), "modelopt_export_path": (None, MODELOPT),
    "quantize_and_serve": (False, MODELOPT),
    "rl_quant_profile": (None, "the flash_rl load format is not built"),
    "disable_priority_preemption": (False, PRIORITY), "default_priority_value": (None, PRIORITY),
    "abort_on_priority_when_disabled": (False, PRIORITY), "schedule_low_priority_values_first": (False, PRIORITY),
    "priority_scheduling_preemption_threshold": (10, PRIORITY),
    "gated_launch_port": (None, "the gated launch server is not built"),
    "dcp_size": (1, CP), "attn_cp_size": (1, CP), "enable_prefill_cp": (False, CP),
    "enable_dsa_prefill_context_parallel": (False, CP), "enable_prefill_context_parallel": (False, CP),
    "moe_dp_size": (1, "MoE data parallelism is not built yet"),
    "dwdp_size": (1, "distributed weight data parallelism is not built yet"),
    "enable_dp_attention": (False, "DP attention is not built yet"),
    "use_ray": (False, "child processes are plain subprocesses; Ray actors are not built"),
    "custom_sigquit_handler": (None, "a failed child process fails pending calls with EngineDeadError instead"),
    "hf_chat_template_name": (None, CHAT), "completion_template": (None, CHAT), "tool_server": (None, CHAT),
    "enable_strict_thinking": (False, "thinking-phase token filtering is not built yet"),
    "log_requests_target": (None, "request logs go to the logger only"),
    "crash_dump_folder": (None, DUMP), "kv_events_config": (None, "KV event publishing is not built yet"),
    "enable_forward_pass_metrics": (False, "forward-pass metrics are not built yet"),
    "enable_trace": (False, "OpenTelemetry tracing is not built yet"),
    "export_metrics_to_file": (False, "metrics files are not built yet"),
    "stat_loggers": (None, "metrics collectors are not built yet"),
    "constrained_json_disable_any_whitespace": (False, "compact-JSON grammars are not built yet"),
    "radix_cache_backend": (None, "radix-cache plugins are not built"),
    "decoupled_spec_role": ("null", SPEC),
    "moe_a2a_backend": ("none", EP), "elastic_ep_backend": (None, EP),
    "ep_join_mode": (None, EP), "elastic_ep_rejoin": (False, EP), "enable_ep_moe": (False, EP),
    "enable_deepep_moe": (False, EP),
    "enable_hisparse": (False, "hierarchical sparse attention is not built"),
    "enable_double_sparsity": (False, "sparse attention is not built"),
    "mm_process_config": (None, "image preprocessing follows the model's processor config"),
    "allowed_media_domains": ([], "media URL allowlists are not built yet"),
    "media_url_max_file_size_mb": (64, "media download size limits are not built yet"),
    "limit_mm_data_per_request": (None, "per-request media limits are not built yet"),
    "image_processor_backend": ("auto", IMAGE_PROC), "disable_fast_image_processor": (False, IMAGE_PROC),
    "offload_group_size": (-1, "layer offloading is not built yet"),
    "kt_weight_path": (None, KTRANSFORMERS), "kt_amx_weight_path": (None, KTRANSFORMERS),
    "dllm_algorithm": (None, "diffusion LLMs are not built"),
    "disaggregation_mode": ("null", PD), "encoder_only": (False, EPD), "language_only": (False, EPD),
    "encoder_urls": ([], EPD), "language_model_only": (False, "the vision tower is always loaded"),
    "custom_weight_loader": (None, WEIGHTS), "checkpoint_engine_wait_weights_before_ready": (False, WEIGHTS),
    "model_checksum": (None, "checkpoint verification is not built yet"),
    "delete_ckpt_after_loading": (False, "checkpoints are never deleted"),
    "decrypted_config_file": (None, DECRYPT), "decrypted_draft_config_file": (None, DECRYPT),
    "rl_on_policy_target": (None, INVARIANT),
    "kv_canary": ("none", "KV-cache canaries are not built"),
    "debug_tensor_dump_output_folder": (None, DUMP), "debug_tensor_dump_input_file": (None, DUMP),
    "debug_tensor_dump_inject": (False, DUMP), "msprobe_dump_config": (None, DUMP),
    "forward_hooks": (None, "forward hooks are not built yet"),
    "return_hidden_states_mode": (None, "only the 'full' mode is built: use enable_return_hidden_states=True"),
    "enable_return_routed_experts": (False, "routed-expert capture is not built yet"),
    "enable_return_indexer_topk": (False, "no sparse-attention indexer"),
    "enable_mis": (False, MIS), "multi_item_scoring_delimiter": (None, MIS),
    "stream_output": (False, "SGLang's older name of incremental_streaming_output: pass that"),
}
# Values besides the default that are accepted: they ask for what Treadle does anyway.
ALSO_ACCEPTED: dict[str, tuple] = {"enable_multimodal": (True,), "model_config_parser": ("hf",)}


def _field(default: Any) -> dataclasses.Field:
    if isinstance(default, (list, dict)):  # a fresh container per instance, as SGLang's default_factory
        return dataclasses.field(default_factory=lambda: copy.copy(default), kw_only=True, repr=False)
    return dataclasses.field(default=default, kw_only=True, repr=False)


SGLangOnlyArgs = dataclasses.make_dataclass(
    "SGLangOnlyArgs",
    [(name, Any, _field(default)) for name, default in
     {**NO_EFFECT, **{name: default for name, (default, _) in REFUSED.items()}}.items()],
)
SGLangOnlyArgs.__doc__ = "SGLang's ServerArgs fields that Treadle accepts without implementing (see the module)."


def refused_settings(args: Any) -> list[str]:
    """``"name=value (why)"`` for each refused argument set to a value other than SGLang's default."""
    out = []
    for name, (default, why) in REFUSED.items():
        value = getattr(args, name)
        if not (value is default or value == default or value in ALSO_ACCEPTED.get(name, ())):
            out.append(f"{name}={value!r} ({why})")
    return out
