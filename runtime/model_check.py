"""What config.json says about a model that can be checked before any process starts: is the
architecture built, does ``context_length`` fit, do the heads split over ``tp_size``. A model
Treadle cannot serve exactly is refused here, in the user's process, with the reason, instead of
failing in a worker after every process has started (or, worse, running and differing)."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from treadle.runtime.checkpoint_names import headless_error
from treadle.runtime.llava_layout import is_llava_llama, vision_tower_dir
from treadle.runtime.hf_config import load_config, model_positions
from treadle.runtime.server_args import ServerArgs

# HF ``architectures`` name -> the gpu_worker/models module that builds it
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3Model": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "BertModel": "bert",
    "LlavaForConditionalGeneration": "llava",
    "LlavaLlamaForCausalLM": "llava_llama",  # the original (liuhaotian) LLaVA layout
    # classification / reward heads and cross-encoders: served by encode / rerank / score as scores
    "LlamaForSequenceClassification": "classification",
    "MistralForSequenceClassification": "classification",
    "Qwen2ForSequenceClassification": "classification",
    "Qwen2ForRewardModel": "classification",
    "BertForSequenceClassification": "cross_encoder",
    "XLMRobertaForSequenceClassification": "cross_encoder",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",  # its language model, text only
    "MixtralForCausalLM": "mixtral",  # mixture-of-experts (gpu_worker/layers/moe.py)
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen2MoeForCausalLM": "qwen2_moe",
}
# Multimodal checkpoints whose language model alone is served (text only: no image processing).
TEXT_ONLY = {"Gemma3ForConditionalGeneration"}
SCORE_MODULES = ("classification", "cross_encoder")  # no LM head: encode only (is_embedding is implied)
# For configs without ``architectures`` (e.g. written by a converter).
ARCH_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                      "bert": "BertModel", "llava": "LlavaForConditionalGeneration",
                      "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                      "gemma3": "Gemma3ForConditionalGeneration"}
# Encoder-only architectures: no LM head, so they can only embed (SGLang's non-generation models).
ENCODER_ONLY = ("BertModel",)
# A sentence-transformers checkpoint declares its pooling in one of these (1_Pooling/config.json...).
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                               os.path.join("1_Pooling", "config.json"))
ARCH_BY_MODEL_TYPE.update({"qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM", "mixtral": "MixtralForCausalLM",
                           "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"})
# modules of decoders with an LM head (a bare backbone may lack it)
DECODERS = ("llama", "qwen3", "phi3", "mixtral", "qwen3_moe", "qwen2_moe")
ALLOW_LONGER_CONTEXT = ("TREADLE_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN", "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN")


def architecture(cfg: dict[str, Any]) -> Optional[str]:
    """The first architecture of the config that Treadle builds (None: none is)."""
    names = list(cfg.get("architectures") or [])
    names += [ARCH_BY_MODEL_TYPE[t] for t in [cfg.get("model_type")] if t in ARCH_BY_MODEL_TYPE]
    return next((n for n in names if n in ARCHITECTURES), None)


def is_embedding_model(model_dir: str) -> bool:
    """Whether the checkpoint is an embedding model by its files, so it needs no ``is_embedding=True``:
    an encoder-only architecture, or the files sentence-transformers writes beside the weights."""
    with open(os.path.join(model_dir, "config.json")) as f:
        arch = architecture(json.load(f))
    if arch in ENCODER_ONLY or (arch is not None and ARCHITECTURES[arch] in SCORE_MODULES):
        return True  # classification / reward heads and cross-encoders have no LM head (SGLang's non-generation list)
    return any(os.path.exists(os.path.join(model_dir, name)) for name in SENTENCE_TRANSFORMERS_FILES)


def check_model(model_dir: str, args: ServerArgs) -> None:
    """Raise ``ValueError`` / ``NotImplementedError`` naming what cannot be served as asked."""
    with open(os.path.join(model_dir, "config.json")) as f:
        raw = json.load(f)
    if architecture(raw) is None:
        shown = raw.get("architectures") or raw.get("model_type")
        raise NotImplementedError(f"Not supported yet by Treadle: model architecture {shown} ({model_dir}); "
                                  f"supported: {', '.join(sorted(ARCHITECTURES))}.")
    if is_llava_llama(raw):  # the original LLaVA layout: its CLIP tower found (or downloaded) before any child starts
        vision_tower_dir(raw, model_dir)
    cfg = load_config(model_dir)
    if args.load_format != "dummy" and ARCHITECTURES[architecture(raw)] in DECODERS:
        headless = headless_error(model_dir, cfg, args.is_embedding or is_embedding_model(model_dir))
        if headless:
            raise ValueError(headless)
    longest = model_positions(cfg)
    asked = args.context_length
    allowed = any(os.environ.get(v, "").lower() in ("1", "true") for v in ALLOW_LONGER_CONTEXT)
    if asked is not None and longest and asked > longest and not allowed:
        raise ValueError(f"context_length={asked} is longer than the model's max_position_embeddings={longest}. "
                         f"Set {ALLOW_LONGER_CONTEXT[0]}=1 (or SGLang's variable) to allow it anyway.")
    experts, expert_width = num_experts(cfg), cfg.get("moe_intermediate_size") or cfg.get("intermediate_size")
    if args.ep_size > 1 and (not experts or experts % args.ep_size):
        raise ValueError(f"ep_size={args.ep_size} needs a mixture-of-experts model whose expert count divides by it; "
                         f"this model has {experts or 'no'} experts.")
    if experts and args.ep_size == 1 and isinstance(expert_width, int) and expert_width % args.tp_size:
        raise ValueError(f"the experts' intermediate size {expert_width} does not divide by tp_size={args.tp_size} "
                         "(each rank holds a slice of every expert; ep_size=tp_size places whole experts instead).")
    if experts and args.enable_deterministic_inference and (str(args.device).startswith("cuda") or args.ep_size > 1):
        raise ValueError("enable_deterministic_inference with a mixture-of-experts model runs on the CPU with "
                         "ep_size=1 only: the fused CUDA MoE kernels pick their tiles by the batch's token count, and "
                         f"the expert-parallel exchange is not checked (device={args.device!r}, ep_size={args.ep_size}).")
    heads = cfg.get("num_attention_heads")
    if isinstance(heads, int) and args.tp_size > 1:
        head_split_problem = head_split_error(heads, cfg.get("num_key_value_heads") or heads, args.tp_size)
        if head_split_problem:
            raise ValueError(head_split_problem)


def num_experts(cfg: dict[str, Any]) -> int:
    """The routed experts of a mixture-of-experts config (Mixtral's ``num_local_experts``, Qwen's
    ``num_experts``); 0 for a dense model."""
    return int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)


def head_split_error(num_heads: int, num_kv_heads: int, tp: int) -> str:
    """Why ``num_heads`` query heads over ``num_kv_heads`` KV heads cannot be split over ``tp``
    ranks ("" if they can). KV heads are split unevenly when there are at least ``tp`` of them
    (each rank takes the query heads of its KV heads); with fewer, each is replicated over
    ``tp / num_kv_heads`` ranks, which needs ``tp`` to be a multiple of them and to divide the
    query heads (gpu_worker/layers/linear.head_partition)."""
    if num_heads % num_kv_heads:
        return f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
    if num_kv_heads < tp and (tp % num_kv_heads or num_heads % tp):
        return (f"heads {num_heads}/{num_kv_heads} cannot be split over tp_size {tp}: with fewer KV heads than "
                f"ranks, tp_size must be a multiple of num_key_value_heads and divide num_attention_heads")
    return ""
