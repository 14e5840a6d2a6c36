"""The FP8 weight schemes a checkpoint's ``quantization_config`` can name, read once (no torch here).

Three spellings of the same thing reach us from the hub:

* ``{"quant_method": "fp8"}`` as vLLM and SGLang read it: per-tensor ``weight_scale`` (one per
  checkpoint tensor), or 128x128 blocks with ``weight_block_size`` and ``weight_scale_inv`` (the
  DeepSeek-V3 and Qwen3-FP8 releases; despite the name the scale multiplies, ``w = q * s``);
* ``{"quant_method": "fbgemm_fp8"}``: per-channel ``weight_scale`` ``[out, 1]``;
* ``{"quant_method": "compressed-tensors"}`` (llm-compressor's ``float-quantized`` format): a config
  group whose weights are 8-bit floats with strategy ``tensor``, ``channel`` or ``block``.

The scale's shape says per-tensor or per-channel, so a scheme records only the block size (None:
one scale per output row or per tensor) and the layers left in the model's dtype. A static
``input_scale`` is read past: activations are always quantized per token at run time, which is at
least as accurate as one calibrated scale per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

FP8_METHODS = ("fp8", "fbgemm_fp8", "compressed-tensors")


@dataclass(frozen=True)
class Fp8Scheme:
    block: Optional[tuple[int, int]] = None  # (rows, cols) of one weight scale; None: per tensor or per row
    ignored: tuple[str, ...] = ()  # HF module names (or "re:" patterns) whose weights are not FP8
    dynamic: bool = False  # a float checkpoint quantized per output row while it loads (quantization="fp8")


def _block(size: Any) -> tuple[int, int]:
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise ValueError(f"FP8 weight_block_size must be two positive ints, got {size!r}")
    if any(v & (v - 1) or v < 16 for v in size):
        raise NotImplementedError(f"FP8 weight_block_size {list(size)}: only powers of two >= 16 are supported")
    return int(size[0]), int(size[1])


def _compressed_tensors(q: dict[str, Any]) -> Optional[Fp8Scheme]:
    groups = list((q.get("config_groups") or {}).values())
    weights = [g.get("weights") or {} for g in groups]
    if not weights:
        raise NotImplementedError("compressed-tensors checkpoint without config_groups")
    kinds = {(w.get("type"), w.get("num_bits")) for w in weights}
    if kinds != {("float", 8)}:
        raise NotImplementedError(f"compressed-tensors weights {sorted(map(str, kinds))}: only 8-bit float (FP8) "
                                  "ones are supported")
    strategies = {w.get("strategy", "tensor") for w in weights}
    if len(strategies) != 1 or not strategies <= {"tensor", "channel", "block"}:
        raise NotImplementedError(f"compressed-tensors FP8 strategy {sorted(strategies)}: one of tensor, channel "
                                  "or block is supported")
    block = _block(weights[0].get("block_structure")) if strategies == {"block"} else None
    return Fp8Scheme(block, tuple(q.get("ignore") or ()))


def fp8_params(q: Any) -> Optional[Fp8Scheme]:
    """The FP8 scheme of a ``quantization_config`` dict; None when it names no FP8 method;
    NotImplementedError for FP8 variants that are not built (e5m2 weights, non-FP8 compressed-tensors)."""
    if not isinstance(q, dict):
        return None
    method = str(q.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        return _compressed_tensors(q)
    if method == "fbgemm_fp8":
        return Fp8Scheme(None, tuple(q.get("modules_to_not_convert") or ()))
    if method != "fp8":
        return None
    if str(q.get("fmt", "e4m3")).lower() != "e4m3":
        raise NotImplementedError(f"FP8 checkpoint with fmt={q.get('fmt')!r}: only e4m3 weights are supported")
    size = q.get("weight_block_size")
    return Fp8Scheme(None if size is None else _block(size), tuple(q.get("ignored_layers") or ()))
