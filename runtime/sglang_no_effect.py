"""SGLang's ``ServerArgs`` fields that Treadle accepts with no effect: the ``NO_EFFECT`` table
(name: SGLang's default) of ``sglang_compat.py``, which explains both of its tables and builds
``SGLangOnlyArgs`` from them. Here: knobs that change speed, memory use or deployment but not
results, knobs of model kinds Treadle does not serve, and lossy speed-ups it does not take. Their
values are only carried (to the child processes, as JSON, and back in ``get_server_info``), so
the one check is that a value can make that trip.
"""

from __future__ import annotations

import json
from typing import Any

from treadle.runtime.redact import SECRET_FIELDS

# ------------------------------------------------------------------ accepted, no effect here
NO_EFFECT: dict[str, Any] = {
    # model and tokenizer: tokenizer speed-ups, loader tuning; Treadle's own model code serves every model_impl
    "tokenizer_backend": "huggingface", "tokenizer_worker_num": 1, "detokenizer_worker_num": 1,
    "model_loader_extra_config": "{}", "model_impl": "auto",
    # precision speed-ups Treadle does not take (results stay exact)
    "enable_tf32_matmul": False, "enable_quant_communications": False, "triton_attention_reduce_in_fp32": False,
    # scheduling and memory tuning
    "prefill_decode_interval": 0, "enable_dynamic_chunking": False, "prefill_max_requests": None,
    "retraction_policy": "length", "c128_page_size": 16, "swa_full_tokens_ratio": 0.8,
    "disable_hybrid_swa_memory": False, "radix_eviction_policy": "lru", "prefill_only_disable_kv_cache": False,
    "enable_page_major_kv_layout": False, "enable_unified_memory": False, "disable_chunked_prefix_cache": False,
    "num_continuous_decode_steps": 1, "scheduler_recv_interval": 1, "enable_session_radix_cache": False,
    "strip_thinking_cache": False, "lora_drain_wait_threshold": 0.0, "enable_lora_overlap_loading": None,
    "max_lora_chunk_size": 16, "lora_strict_loading": False,  # adapters that do not fit fail to load anyway
    "enable_prefill_delayer": False, "prefill_delayer_max_delay_passes": 30,
    "prefill_delayer_token_usage_low_watermark": None, "prefill_delayer_forward_passes_buckets": None,
    "prefill_delayer_wait_seconds_buckets": None, "prefill_delayer_queue_min_ratio": None,
    "prefill_delayer_max_delay_ms": None, "min_free_slots_delay": None,
    "pdmux_config_path": None, "sm_group_num": 8, "enable_two_batch_overlap": False,
    "enable_single_batch_overlap": False, "tbo_token_distribution_threshold": 0.48,
    # KV offload tiers (the prefix cache stays on the device)
    "enable_hierarchical_cache": False, "hicache_host_memory_mode": "cache", "hicache_ratio": None,
    "hicache_size": 0, "hicache_write_policy": "write_through", "hicache_io_backend": "kernel",
    "hicache_mem_layout": "page_first", "hicache_storage_backend": None, "hicache_storage_prefetch_policy": "timeout",
    "hicache_storage_backend_extra_config": None, "hisparse_config": None, "enable_lmcache": False,
    "lmcache_config_file": None, "enable_flexkv": False, "flexkv_config_file": None,
    "offload_num_in_group": 1, "offload_prefetch_step": 1, "offload_mode": "cpu",
    # parallelism tuning; settings read only by the parallel modes refused below
    "nccl_port": None, "dist_timeout": None, "pp_max_micro_batch_size": None, "pp_async_batch_depth": 0,
    "load_balance_method": "auto", "dcp_comm_backend": "ag_rs", "dcp_replicate_q_proj": None, "cp_strategy": None,
    "enable_dsa_cache_layer_split": False, "dsa_prefill_cp_mode": "round-robin-split",
    "prefill_cp_mode": "in-seq-split", "enable_cp_decode_attn_tp": False,
    "enable_dp_attention_local_control_broadcast": False, "enable_dp_lm_head": False,
    "enable_tp_lm_head_all_to_all": None, "enable_attn_tp_input_scattered": False,
    "enable_shared_experts_attn_tp": False, "enable_dense_mlp_attn_tp": False, "disable_attn_tp_gather": False,
    "enable_p2p_check": False,
    # process placement and supervision
    "mlx_enable_sampling": False, "soft_watchdog_timeout": None, "sleep_on_idle": False, "numa_node": None,
    "gc_threshold": None,
    # HTTP / gRPC server, TLS, API keys, OpenAI-server details (the Engine has no server)
    "host": "127.0.0.1", "port": 30000, "fastapi_root_path": "", "smg_grpc_mode": False, "grpc_mode": False,
    "grpc_port": None, "sidecar": None, "sidecar_args": None, "skip_server_warmup": False, "warmups": None,
    "enable_http2": False, "http2_max_concurrent_streams": 200, "ssl_keyfile": None, "ssl_certfile": None,
    "ssl_ca_certs": None, "ssl_keyfile_password": None, "enable_ssl_refresh": False, "api_key": None,
    "admin_api_key": None, "file_storage_path": "sglang_storage", "enable_cache_report": False,
    "sampling_defaults": "model", "asr_max_buffer_seconds": 60, "asr_max_concurrent_sessions": 32,
    "batch_notify_size": 16, "stream_response_default_include_usage": False, "log_level_http": None,
    "uvicorn_access_log_exclude_prefixes": [], "smg_http_sidecar_port": None,
    # metrics and logging details (no Prometheus endpoint)
    "log_requests_format": "text", "enable_mfu_metrics": False, "enable_metrics_for_all_schedulers": False,
    "load_snapshot_publish_interval": 15, "tokenizer_metrics_custom_labels_header": "x-custom-labels",
    "tokenizer_metrics_allowed_custom_labels": None, "extra_metric_labels": None,
    "bucket_time_to_first_token": None, "bucket_inter_token_latency": None, "bucket_e2e_request_latency": None,
    "prompt_tokens_buckets": None, "generation_tokens_buckets": None, "gc_warning_threshold_secs": 0.0,
    "decode_log_interval": 40, "enable_request_time_stats_logging": False, "forward_pass_metrics_worker_id": "",
    "forward_pass_metrics_ipc_name": None, "trace_modules": "request", "otlp_traces_endpoint": "localhost:4317",
    "export_metrics_to_file_dir": None, "kv_canary_real_data": "none", "kv_canary_sweep_interval": 0,
    "debug_tensor_dump_layers": None,
    # constrained decoding: outlines / llguidance only (Treadle's grammars are xgrammar's)
    "constrained_json_whitespace_pattern": None, "disable_outlines_disk_cache": False,
    # kernel choices: Treadle has one implementation of each (attention: attention_backend)
    "decode_attention_backend": None, "prefill_attention_backend": None, "mm_attention_backend": None,
    "fp8_gemm_runner_backend": "auto", "fp4_gemm_runner_backend": "auto", "bf16_gemm_backend": "auto",
    "disable_flashinfer_autotune": False, "flashinfer_autotune_skip_ops": None,
    "triton_attention_num_kv_splits": 8, "triton_attention_split_tile_size": None,
    "flashinfer_mla_disable_ragged": False, "enable_fused_qk_norm_rope": False,
    "enable_precise_embedding_interpolation": False,
    # CUDA graphs and torch.compile (Treadle's decode graphs: cuda_graph_max_bs, disable_cuda_graph)
    "cuda_graph_config": None, "cuda_graph_backend_decode": None, "cuda_graph_backend_prefill": None,
    "cuda_graph_max_bs_decode": None, "cuda_graph_max_bs_prefill": None, "cuda_graph_bs_decode": None,
    "cuda_graph_bs_prefill": None, "cuda_graph_tc_compiler": None, "disable_prefill_cuda_graph": False,
    "disable_decode_cuda_graph": False, "disable_cuda_graph_padding": False, "enable_profile_cuda_graph": False,
    "enable_cudagraph_gc": False, "debug_cuda_graph": False, "enable_torch_compile": False,
    "enable_torch_compile_debug_mode": False, "torch_compile_max_bs": 32,
    # collectives (Treadle's own: disable_custom_all_reduce, enable_allreduce_fusion)
    "enable_layerwise_nvtx_marker": False, "enable_nccl_nvls": False, "enable_symm_mem": False,
    "enable_mscclpp": False, "enable_torch_symm_mem": False, "enable_scattered_sconv": False, "pre_warm_nccl": False,
    "enable_flashinfer_allreduce_fusion": False, "enforce_disable_flashinfer_allreduce_fusion": False,
    "flashinfer_allreduce_fusion_backend": None, "enable_aiter_allreduce_fusion": False,
    # speculative-decoding tuning Treadle does not read (its own: runtime/spec_args.py)
    "speculative_draft_model_revision": None, "speculative_draft_load_format": None, "speculative_dflash_block_size": None,
    "speculative_dspark_block_size": None, "speculative_dspark_sps_table_path": None,
    "speculative_dspark_confidence_sts_path": None, "speculative_dspark_align_verify_tokens_to_graph_tier": False,
    "speculative_accept_threshold_single": 1.0, "speculative_accept_threshold_acc": 1.0,
    "speculative_use_rejection_sampling": False, "speculative_token_map": None,
    "speculative_attention_mode": "prefill", "speculative_draft_attention_backend": None,
    "speculative_dsa_topk_backend": "sgl-kernel", "speculative_draft_kv_cache_dtype": None,
    "speculative_draft_window_size": None, "speculative_moe_runner_backend": None,
    "speculative_moe_a2a_backend": None, "speculative_draft_model_quantization": None,
    "speculative_skip_dp_mlp_sync": False, "enable_multi_layer_eagle": False, "speculative_adaptive": False,
    "speculative_adaptive_config": None, "decoupled_spec_bind_endpoint": None,
    "decoupled_spec_connect_endpoints": None, "decoupled_spec_rank": None, "spec_trace_dir": None,
    "speculative_ngram_min_bfs_breadth": 1, "speculative_ngram_max_bfs_breadth": 10,
    "speculative_ngram_match_type": "BFS", "speculative_ngram_max_trie_depth": 18,
    "speculative_ngram_capacity": 10_000_000, "speculative_ngram_external_corpus_path": None,
    "speculative_ngram_external_sam_budget": 0, "speculative_ngram_external_corpus_max_tokens": 10_000_000,
    # MoE, Mamba / linear attention and DeepSeek sparse attention: model kinds Treadle does not serve
    "enable_fused_moe_sum_all_reduce": False, "enable_deepseek_v4_fp4_indexer": False,
    "dsa_prefill_backend": None, "dsv4_prefill_backend": "auto", "dsa_decode_backend": None,
    "dsa_paged_mqa_logits_backend": "auto", "dsa_topk_backend": "sgl-kernel", "mamba_backend": "triton",
    "enable_w4a4_mxfp4_megamoe": False, "deepep_v2_mode": "direct", "moe_runner_backend": "auto",
    "flashinfer_mxfp4_moe_precision": "default", "deepep_mode": "auto", "fuseep_mode": 2,
    "deepep_dispatcher_output_dtype": "auto", "ep_num_redundant_experts": 0, "ep_dispatch_algorithm": None,
    "init_expert_location": "trivial", "enable_eplb": False, "eplb_algorithm": "auto",
    "eplb_rebalance_num_iterations": 1000, "eplb_rebalance_layers_per_chunk": None,
    "eplb_min_rebalancing_utilization_threshold": 1.0, "expert_distribution_recorder_mode": None,
    "expert_distribution_recorder_buffer_size": None, "expert_balancedness_report_mode": "off",
    "deepep_config": None, "moe_dense_tp_size": None, "enable_elastic_expert_backup": False,
    "mooncake_ib_device": None, "enable_waterfill": False, "ep_join_rank_offset": 0, "elastic_ep_initial_size": None,
    "max_ep_size": None, "elastic_ep_scale_timeout": 600, "disable_flashinfer_cutlass_moe_fp4_allgather": False,
    "disable_shared_experts_fusion": False, "enforce_shared_experts_fusion": False,
    "experts_shared_outer_loras": None, "lora_use_virtual_experts": False, "kt_method": "AMXINT4",
    "kt_cpuinfer": None, "kt_threadpool_count": 2, "kt_num_gpu_experts": None,
    "kt_max_deferred_experts_per_token": None, "max_mamba_cache_size": None, "mamba_ssm_dtype": None,
    "mamba_max_states_per_path": -1, "enable_mamba_cache_stochastic_rounding": False,
    "mamba_cache_philox_rounds": 0, "mamba_full_memory_ratio": 0.9, "mamba_radix_cache_strategy": "auto",
    "uses_mamba_radix_cache": False, "mamba_track_interval": 256, "enable_int8_mamba_checkpoint": False,
    "int8_mamba_ckpt_size": None, "linear_attn_backend": "triton", "linear_attn_decode_backend": None,
    "linear_attn_prefill_backend": None, "linear_attn_verify_backend": None, "enable_linear_replayssm": False,
    "linear_replayssm_cache_len": 16, "enable_linear_replayssm_spec": False,
    # multimodal speed-ups and transports (the vision tower runs in the worker)
    "enable_broadcast_mm_inputs_process": False, "enable_prefix_mm_cache": False, "mm_enable_dp_encoder": False,
    "mm_processor_worker_num": 0, "mm_io_worker_num": 0, "mm_preprocess_cache_size_mb": None,
    "trust_mm_content_hashes": False, "enable_mm_global_cache": False, "mm_global_cache_backend": "mooncake",
    "mm_feature_transport": None, "keep_mm_feature_on_device": False,
    # settings read only by PD / encoder disaggregation, diffusion LLMs or KTransformers (refused below)
    "disaggregation_transfer_backend": "mooncake", "disaggregation_bootstrap_port": 8998,
    "disaggregation_ib_device": None, "disaggregation_decode_enable_radix_cache": False,
    "disaggregation_decode_enable_offload_kvcache": False, "disaggregation_decode_retraction_backup": None,
    "num_reserved_decode_tokens": 512, "disaggregation_decode_extra_slots": None,
    "disaggregation_decode_polling_interval": 1, "optimistic_prefill_attempts": 0,
    "encoder_transfer_backend": "auto", "encoder_bootstrap_port": 8997, "encoder_register_urls": [],
    "enable_adaptive_dispatch_to_encoder": False, "dllm_algorithm_config": None, "dllm_fdfo": True,
    # weight loading: remote / cached loaders
    "startup_weight_load_mode": "serial", "weight_loader_disable_mmap": False,
    "weight_loader_prefetch_checkpoints": False, "weight_loader_prefetch_num_threads": 4,
    "weight_loader_drop_cache_after_load": False, "remote_instance_weight_loader_seed_instance_ip": None,
    "remote_instance_weight_loader_seed_instance_service_port": None,
    "remote_instance_weight_loader_send_weights_group_ports": None,
    "remote_instance_weight_loader_backend": "nccl",
    "remote_instance_weight_loader_start_seed_via_transfer_engine": False, "engine_info_bootstrap_port": 6789,
    "modelexpress_config": None, "weight_cache_mode": "off", "weight_cache_socket": None,
    "weight_cache_timeout": 1800,
    # tokenizer batching; memory release (release_memory_occupation is not built: the flag alone does nothing)
    "enable_dynamic_batch_tokenizer": False, "dynamic_batch_tokenizer_batch_size": 32,
    "dynamic_batch_tokenizer_batch_timeout": 0.002, "enable_tokenizer_batch_encode": False,
    "disable_tokenizer_batch_decode": False, "enable_memory_saver": False, "enable_weights_cpu_backup": False,
    "enable_draft_weights_cpu_backup": False,
    # chat: `treadle serve` reads them (its OpenAI routes); the Engine itself takes prompts and ignores them
    "chat_template": None, "reasoning_parser": None, "tool_call_parser": None, "default_chat_template_kwargs": None,
    # names of late-2025 releases that commit 001067ff renamed or dropped
    "cuda_graph_bs": None, "enable_piecewise_cuda_graph": False, "piecewise_cuda_graph_max_tokens": 4096,
    "piecewise_cuda_graph_tokens": None, "piecewise_cuda_graph_compiler": "eager", "enable_nan_detection": False,
    "hybrid_kvcache_ratio": None, "load_watch_interval": 0.1, "prefill_round_robin_balance": False,
    "nsa_prefill_backend": "flashmla_sparse", "nsa_decode_backend": "fa3", "collect_tokens_histogram": False,
    "speculative_ngram_branch_length": 18, "enable_expert_distribution_metrics": False, "kt_amx_method": None,
    "ds_channel_config_path": None, "ds_heavy_channel_num": 32, "ds_heavy_token_num": 256,
    "ds_heavy_channel_type": "qk", "ds_sparse_decode_threshold": 4096, "disaggregation_decode_tp": None,
    "disaggregation_decode_dp": None, "disaggregation_prefill_pp": 1, "mm_max_concurrent_calls": 32,
    "mm_per_request_timeout": 10.0, "disable_mla": False,
}


def check_no_effect_values(args: Any) -> None:
    """A no-effect value is only carried, but it is carried to the child processes as JSON: refuse
    (``ValueError``) what cannot make that trip, here rather than in a child."""
    for name, default in NO_EFFECT.items():
        value = getattr(args, name)
        if value is default or value == default:
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            shown = "a value" if name in SECRET_FIELDS else repr(value)  # an API key stays out of the message
            raise ValueError(f"{name} must be a JSON-serializable value, got {shown}.") from None
