"""AWQ and GPTQ 4-bit checkpoints: their settings, their packed tensors, and one logical view of both.

Both formats store a linear layer as ``qweight`` (4-bit codes, eight to an int32 word), ``qzeros``
(4-bit zero points per group of ``group_size`` inputs, packed the same way), ``scales`` (one per
group and output) and, for GPTQ, ``g_idx`` (each input's group). The weight is
``(q - z) * s`` per group, transposed to a linear layer's ``[out, in]``. They differ in packing:

- AWQ (AutoAWQ "gemm"): ``qweight [in, out/8]``, word column ``c`` holding output columns
  ``8c + AWQ_ORDER[i]`` in nibble ``i``; ``qzeros [in/g, out/8]`` likewise (``gpu_worker/awq.py``).
- GPTQ: ``qweight [in/8, out]``, word row ``r`` holding inputs ``8r + i`` in nibble ``i``;
  ``qzeros [in/g, out/8]`` with output ``8c + i`` in nibble ``i``, stored one less than the real
  zero in the ``gptq`` checkpoint format (not in ``gptq_v2``). With ``desc_act`` the inputs were
  quantized in another order and ``g_idx`` says which group each belongs to.

``logical`` turns every part into the same shapes (codes ``[in, out]``, zeros and scales
``[groups, out]``), which the CPU dequantizes at load (``dequantized``) and the GPU layers slice
for their rank and repack (``int4_linear``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch

from treadle.gpu_worker.awq import AWQ_ORDER
from treadle.runtime.hf_config import INT4_NAMES, awq_params, gptq_params

_SHIFTS = tuple(range(0, 32, 4))
_AWQ_NIBBLE = tuple(AWQ_ORDER.index(i) for i in range(8))  # the nibble that holds column 8c + i


@dataclass(frozen=True)
class Int4Config:
    method: str  # "awq" or "gptq"
    group_size: int  # inputs per scale; -1: all of them
    desc_act: bool = False  # GPTQ act-order: inputs grouped by g_idx, not by position
    zero_offset: int = 0  # added to stored zeros (1 in the GPTQ "gptq" format)
    skip: tuple[str, ...] = ()  # modules_to_not_convert: layers the checkpoint keeps dense (not_converted.py)

    @property
    def parts(self) -> tuple[str, ...]:
        """The checkpoint tensors of one layer this format reads (GPTQ's g_idx only with desc_act:
        otherwise it is position // group_size, which the layers know)."""
        return ("qweight", "qzeros", "scales") + (("g_idx",) if self.desc_act else ())


def int4_config(model_config: Any, quantization: Optional[str] = None) -> Optional[Int4Config]:
    """The checkpoint's AWQ or GPTQ settings (an HF config object or a dict), else None. A model
    without them asked for ``quantization="awq"|"gptq"`` (random weights, ``load_format="dummy"``)
    gets the common settings: group 128, AWQ with zero points, GPTQ symmetric."""
    q = model_config.get("quantization_config") if isinstance(model_config, dict) else \
        getattr(model_config, "quantization_config", None)
    text = None if isinstance(model_config, dict) else getattr(model_config, "text_config", None)
    if q is None and text is not None:
        q = getattr(text, "quantization_config", None)
    if q is not None and not isinstance(q, dict):
        q = q.to_dict() if hasattr(q, "to_dict") else dict(q)
    awq, gptq = awq_params(q), gptq_params(q)
    # layers kept dense: modules_to_not_convert, and GPTQModel's "-:<regex>" rules of `dynamic`
    skip = tuple((q or {}).get("modules_to_not_convert") or ()) + \
        tuple("re:" + k[2:] for k in ((q or {}).get("dynamic") or {}) if k.startswith("-:"))
    if awq is not None:
        return Int4Config("awq", awq["group_size"], skip=skip)
    if gptq is not None:
        return Int4Config("gptq", gptq["group_size"], gptq["desc_act"], gptq["zero_offset"], skip)
    if q is None and quantization in INT4_NAMES["awq"]:
        return Int4Config("awq", 128)
    if q is None and quantization in INT4_NAMES["gptq"]:
        return Int4Config("gptq", 128, False, 1)
    return None


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """``[r, c]`` int32 words -> ``[8r, c]`` uint8 codes, row ``8r + i`` from nibble ``i``."""
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=packed.device)
    nib = (packed.to(torch.int32)[:, None, :] >> shifts[None, :, None]) & 0xF  # [r, 8, c]
    return nib.reshape(-1, packed.shape[1]).to(torch.uint8)


def unpack_cols(packed: torch.Tensor) -> torch.Tensor:
    """``[r, c]`` int32 words -> ``[r, 8c]`` uint8 codes, column ``8c + i`` from nibble ``i``."""
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=packed.device)
    nib = (packed.to(torch.int32)[:, :, None] >> shifts) & 0xF  # [r, c, 8]
    return nib.reshape(packed.shape[0], -1).to(torch.uint8)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """AWQ's ``[r, c]`` words -> ``[r, 8c]`` uint8 codes in column order (``awq.unpack``, on the
    words' own device: the GPU unpacks where the weights land)."""
    nib = unpack_cols(packed).reshape(packed.shape[0], -1, 8)
    return nib[:, :, torch.tensor(_AWQ_NIBBLE, device=packed.device)].reshape(packed.shape[0], -1)


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """``[K, N]`` codes 0..15 -> ``[K/8, N]`` int32, nibble ``i`` of word row ``r`` holding row
    ``8r + i``: the layout the Triton kernels read (``layers/triton_int4.py``)."""
    k, n = codes.shape
    if k % 8:
        raise ValueError(f"cannot pack {k} rows of 4-bit codes into int32 words (not a multiple of 8)")
    c = codes.to(torch.int32).reshape(k // 8, 8, n)
    word = torch.zeros(k // 8, n, dtype=torch.int32, device=codes.device)
    for i in range(8):  # int32 shifts wrap into the sign bit, which is what the packed word holds
        word |= c[:, i] << (4 * i)
    return word


def pack_kmajor(codes: torch.Tensor, rows_at_once: int = 4096) -> torch.Tensor:
    """``[K, N]`` codes 0..15 -> the Triton kernels' ``[N, K/8]`` int32 words
    (``layers/triton_int4.py``): one output's words contiguous, in blocks of 4 words (16 bytes)
    holding 32 consecutive inputs, input ``32b + 4i + j`` in nibble ``i`` of word ``4b + j``, so
    nibble ``i`` of a block's 4 words is 4 consecutive inputs. In row chunks: the int32
    temporaries stay small."""
    k, n = codes.shape
    if k % 32:
        raise ValueError(f"cannot pack {k} inputs of 4-bit codes for the GPU kernels (not a multiple of 32)")
    words = torch.empty((n, k // 8), dtype=torch.int32, device=codes.device)
    for n0 in range(0, n, rows_at_once):
        c = codes[:, n0:n0 + rows_at_once].t().to(torch.int32).reshape(-1, k // 32, 8, 4)
        word = c[:, :, 0].clone()
        for i in range(1, 8):  # int32 shifts wrap into the sign bit, which is what the packed word holds
            word |= c[:, :, i] << (4 * i)
        words[n0:n0 + rows_at_once] = word.reshape(-1, k // 8)
    return words


def unpack_kmajor(words: torch.Tensor) -> torch.Tensor:
    """``pack_kmajor``'s ``[N, K/8]`` words -> ``[K, N]`` uint8 codes."""
    n, kw = words.shape
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=words.device)
    nib = (words.to(torch.int32).reshape(n, kw // 4, 1, 4) >> shifts[None, None, :, None]) & 0xF  # [N, K/32, 8, 4]
    return nib.reshape(n, kw * 8).t().to(torch.uint8)


def logical(cfg: Int4Config, part: str, t: torch.Tensor) -> torch.Tensor:
    """One checkpoint part in the shared shapes: ``qweight`` -> codes ``[in, out]`` uint8,
    ``qzeros`` -> zeros ``[groups, out]`` uint8 (offset applied: 0..16), ``scales`` as stored,
    ``g_idx`` -> int64 ``[in]``."""
    if part == "qweight":
        return unpack_awq(t) if cfg.method == "awq" else unpack_rows(t)
    if part == "qzeros":
        z = unpack_awq(t) if cfg.method == "awq" else unpack_cols(t)
        return z + cfg.zero_offset if cfg.zero_offset else z
    if part == "g_idx":
        return t.to(torch.int64)
    return t


def dequantize(codes: torch.Tensor, zeros: Optional[torch.Tensor], scales: torch.Tensor,
               g_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The ``[out, in]`` float32 weight of logical parts (``zeros`` None: symmetric, 8); ``g_idx``
    each input's group (None: consecutive groups of ``in / groups``)."""
    k = codes.shape[0]
    if g_idx is None:
        if k % scales.shape[0]:
            raise ValueError(f"{k} inputs do not split into {scales.shape[0]} groups")
        g_idx = torch.arange(k, device=codes.device) // (k // scales.shape[0])
    z = 8.0 if zeros is None else zeros.to(torch.float32)[g_idx]
    return ((codes.to(torch.float32) - z) * scales.to(torch.float32)[g_idx]).t().contiguous()


def dequantize_parts(cfg: Int4Config, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The ``[out, in]`` float32 weight of one layer's checkpoint parts."""
    codes, zeros, scales = (logical(cfg, p, parts[p]) for p in ("qweight", "qzeros", "scales"))
    g_idx = logical(cfg, "g_idx", parts["g_idx"]) if cfg.desc_act else None
    groups = 1 if cfg.group_size == -1 else codes.shape[0] // cfg.group_size
    if codes.shape[0] % (codes.shape[0] if cfg.group_size == -1 else cfg.group_size) or \
            zeros.shape != scales.shape or scales.shape != (groups, codes.shape[1]):
        raise ValueError(f"{cfg.method.upper()} tensors do not fit together: qweight {tuple(parts['qweight'].shape)}, "
                         f"qzeros {tuple(parts['qzeros'].shape)}, scales {tuple(parts['scales'].shape)}, "
                         f"group_size {cfg.group_size}")
    return dequantize(codes, zeros, scales, g_idx)


def split_name(name: str, cfg: Int4Config) -> tuple[str, Optional[str]]:
    """``(layer prefix, part)`` of a quantized layer's tensor; part None for any other tensor.
    GPTQ's ``g_idx`` without desc_act is the part ``"skip"``: position order, nothing to read."""
    prefix, _, part = name.rpartition(".")
    if part == "g_idx" and cfg.method == "gptq" and not cfg.desc_act:
        return prefix, "skip"
    return (prefix, part) if part in cfg.parts else (name, None)


def dequantized(weights: Iterator[tuple[str, Any]], cfg: Int4Config) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass a checkpoint's tensors through, turning each quantized layer's parts into its float32
    ``weight`` as soon as all have been read (they may come in any order): the CPU's path."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        prefix, part = split_name(name, cfg)
        if part is None:
            yield name, tensor
            continue
        if part == "skip":
            continue
        parts = pending.setdefault(prefix, {})
        parts[part] = tensor[:]  # a lazy checkpoint tensor is read whole: dequantizing needs all of it
        if len(parts) == len(cfg.parts):
            del pending[prefix]
            yield f"{prefix}.weight", dequantize_parts(cfg, parts)
    if pending:
        prefix, parts = next(iter(pending.items()))
        raise ValueError(f"{cfg.method.upper()} layer {prefix!r} lacks {sorted(set(cfg.parts) - set(parts))} "
                         "in the checkpoint")


def packed(weights: Iterator[tuple[str, Any]], cfg: Int4Config) -> Iterator[tuple[str, Any]]:
    """The GPU's path: the parts go to the quantized layers as they are (``int4_linear``), less
    the position-order ``g_idx`` that carries nothing."""
    return ((name, t) for name, t in weights if split_name(name, cfg)[1] != "skip")


def keeps(keep: Optional[Callable[[str], bool]], cfg: Int4Config) -> Optional[Callable[[str], bool]]:
    """A pipeline stage's tensor filter that also knows the quantized parts of the weights it keeps."""
    if keep is None:
        return None

    def wants(name: str) -> bool:
        prefix, part = split_name(name, cfg)
        return keep(name if part is None else f"{prefix}.weight")
    return wants
