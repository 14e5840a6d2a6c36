"""Model facts every process needs, read from the resolved HF directory (no torch here)."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from treadle.runtime.fp8_config import FP8_METHODS, fp8_params
from treadle.runtime.server_args import ServerArgs
from treadle.runtime.tokenizer import load_tokenizer  # noqa: F401  (re-exported)


def load_config(model_dir: str) -> dict[str, Any]:
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    return cfg.get("text_config", cfg) if "vocab_size" not in cfg else cfg


def context_length(cfg: dict[str, Any], args: ServerArgs, model_dir: Optional[str] = None) -> int:
    """``context_length`` if given, else the model's; a sentence-transformers checkpoint's
    ``max_seq_length`` (what it was trained to embed) caps an encoder's positions. A sliding
    attention window does not cap the context: the attention backends mask by it."""
    n = model_positions(cfg) or 2048
    st = os.path.join(model_dir, "sentence_bert_config.json") if model_dir else ""
    if st and os.path.exists(st):
        with open(st) as f:
            n = min(n, int(json.load(f).get("max_seq_length") or n))
    return args.context_length if args.context_length is not None else n


def model_positions(cfg: dict[str, Any]) -> Optional[int]:
    """The most positions the model was built for (None: its config does not say). As SGLang
    counts them: a RoPE scaling ``factor`` stretches ``max_position_embeddings`` unless the config
    names ``original_max_position_embeddings`` (then the max already is the stretched length) or
    the type is ``llama3`` (e.g. dynamic NTK with factor 2 serves twice the trained length)."""
    n = cfg.get("max_position_embeddings") or cfg.get("n_positions")
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    factor = rope.get("factor") if isinstance(rope, dict) else None
    kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if n and factor and "original_max_position_embeddings" not in rope and kind != "llama3":
        n = n * factor
    if n and cfg.get("model_type") in ("roberta", "xlm-roberta"):  # positions count from pad_token_id + 1
        pad = cfg.get("pad_token_id")
        n -= (1 if pad is None else int(pad)) + 1
    return int(n) if n else None


def sliding_window(cfg: dict[str, Any]) -> Optional[int]:
    """The attention window the model's layers use, or None. Qwen2-style configs name one but use
    it only with ``use_sliding_window`` (False when absent, as transformers reads them)."""
    window = cfg.get("sliding_window")
    in_use = cfg.get("use_sliding_window", cfg.get("model_type") not in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe"))
    return window if isinstance(window, int) and window > 0 and in_use else None


def eos_token_ids(model_dir: str, tokenizer: Any = None) -> set[int]:
    """EOS ids from config.json, generation_config.json and the tokenizer (all of them stop)."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        path = os.path.join(model_dir, name)
        if os.path.exists(path):
            with open(path) as f:
                v = json.load(f).get("eos_token_id")
            ids.update([v] if isinstance(v, int) else (v or []))
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def vocab_size(cfg: dict[str, Any], tokenizer: Optional[Any] = None) -> int:
    return int(cfg.get("vocab_size") or len(tokenizer))


def awq_params(q: Any) -> Optional[dict[str, int]]:
    """``{"group_size": N}`` for an AWQ ``quantization_config`` (a dict) that Treadle loads; None
    for anything that is not AWQ; NotImplementedError for AWQ variants it cannot load. The one
    parser of AWQ settings: the client checks a checkpoint with it before start-up and the worker
    reads the group size with it (``gpu_worker/awq.py``)."""
    if not isinstance(q, dict) or str(q.get("quant_method", "")).lower() != "awq":
        return None
    bits, version = q.get("bits", q.get("w_bit", 4)), str(q.get("version", "gemm")).lower()
    if bits != 4:
        raise NotImplementedError(f"AWQ with bits={bits} is not supported (4-bit only).")
    if version != "gemm":
        raise NotImplementedError(f"AWQ version={version!r} is not supported (the 'gemm' layout only).")
    if not q.get("zero_point", True):
        raise NotImplementedError("AWQ without zero points (zero_point=False) is not supported.")
    return {"group_size": int(q.get("group_size", q.get("q_group_size", 128)))}


def gptq_params(q: Any) -> Optional[dict[str, Any]]:
    """``{"group_size", "desc_act", "sym", "zero_offset"}`` for a GPTQ ``quantization_config`` that
    Treadle loads (4-bit, the AutoGPTQ ``gptq`` layout whose stored zeros are one less than the
    real ones, or ``gptq_v2`` which stores them as they are); None for anything that is not GPTQ;
    NotImplementedError for variants it cannot load. ``group_size`` -1: one group per output column."""
    if not isinstance(q, dict) or str(q.get("quant_method", "")).lower() != "gptq":
        return None
    bits, fmt = q.get("bits", 4), str(q.get("checkpoint_format", "gptq")).lower()
    if bits != 4:
        raise NotImplementedError(f"GPTQ with bits={bits} is not supported (4-bit only).")
    if fmt not in ("gptq", "gptq_v2"):
        raise NotImplementedError(f"GPTQ checkpoint_format={fmt!r} is not supported ('gptq' and 'gptq_v2' only).")
    group = int(q.get("group_size", 128))
    if group != -1 and (group <= 0 or group % 8):
        raise NotImplementedError(f"GPTQ group_size={group} is not supported (-1 or a positive multiple of 8).")
    other = [k for k in (q.get("dynamic") or {}) if not str(k).startswith("-:")]
    if other:
        raise NotImplementedError(f"GPTQ dynamic per-module settings {other[:3]} are not supported (only '-:' rules, "
                                  "which leave the modules they match unquantized).")
    return {"group_size": group, "desc_act": bool(q.get("desc_act", False)), "sym": bool(q.get("sym", True)),
            "zero_offset": 1 if fmt == "gptq" else 0}


INT4_NAMES = {"awq": ("awq", "awq_marlin"), "gptq": ("gptq", "gptq_marlin")}  # quantization= spellings


def check_quantization(model_dir: str, quantization: Optional[str], load_format: str = "auto") -> None:
    """``quantization`` must name what the checkpoint holds: AWQ and GPTQ checkpoints load
    (``gpu_worker/quant``) with ``None`` or their own names (``awq``/``awq_marlin``,
    ``gptq``/``gptq_marlin``), FP8 ones (``fp8_config.py``) with ``None`` or ``"fp8"`` (which on a
    float checkpoint quantizes it at load); asking for one on another checkpoint is a ValueError, as in SGLang,
    except with ``load_format="dummy"``, which makes random weights in that format (benchmarks); a
    variant Treadle cannot load is a NotImplementedError here, before any process starts."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    q = cfg.get("quantization_config") or cfg.get("text_config", {}).get("quantization_config") or {}
    method = str(q.get("quant_method", "")).lower() or None
    awq_params(q)
    gptq_params(q)
    if fp8_params(q) is not None:  # FP8 checkpoints (runtime/fp8_config.py): None or "fp8" asks for them
        if quantization not in (None, "fp8"):
            raise ValueError(f"quantization={quantization!r}, but {model_dir} is an FP8 checkpoint ({method}).")
        return
    if quantization == "fp8" and method is not None:
        raise ValueError(f"quantization='fp8' quantizes float checkpoints; {model_dir} is a {method} checkpoint.")
    for family, names in INT4_NAMES.items():
        if quantization in names and method != family and not (method is None and load_format == "dummy"):
            article = "an" if family == "awq" else "a"
            raise ValueError(f"quantization={quantization!r}, but {model_dir} is not {article} {family.upper()} checkpoint "
                             f"(its config.json has no {family.upper()} quantization_config).")
    if method is not None and method not in INT4_NAMES and quantization is None:
        raise NotImplementedError(f"Not supported yet by Treadle: {method} checkpoints (quantization_config in "
                                  f"{model_dir}/config.json); AWQ, GPTQ, FP8 ({', '.join(FP8_METHODS)}) and GGUF ones load.")
    if method in INT4_NAMES and quantization not in (None, *INT4_NAMES[method]):
        article = "an" if method == "awq" else "a"
        raise ValueError(f"quantization={quantization!r}, but {model_dir} is {article} {method.upper()} checkpoint.")
