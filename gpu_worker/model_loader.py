"""Building the model on its device and filling its weights: element types, the model class, the
checkpoint (plain, or AWQ/GPTQ: kept packed in 4-bit layers on CUDA, dequantized while read on
the CPU) or seeded random weights, and the choice of the Triton GEMV for one-token products."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch

from treadle.gpu_worker import fp8, fp8_ignored
from treadle.gpu_worker.distributed import first_failed_rank
from treadle.gpu_worker.layers.linear import quantized_layers, use_triton_gemv
from treadle.gpu_worker.layers.pdl import pdl_supported
from treadle.gpu_worker.loader import init_dummy_weights, iter_safetensors
from treadle.gpu_worker.models.base import ModelBase
from treadle.gpu_worker.models.registry import get_model_class
from treadle.gpu_worker.quant import int4_format
from treadle.gpu_worker.quant.int4_linear import Int4Method, finish_int4, int4_layers, restore_dense
from treadle.runtime.resolve_args import DTYPE_ALIASES

# torch's names; SGLang's other spellings are aliases of them (runtime/resolve_args.DTYPE_ALIASES)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_KV_DTYPES = {**_DTYPES, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def resolve_kv_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's element type: ``auto`` is the model's."""
    if name == "auto":
        return model_dtype
    name = DTYPE_ALIASES.get(name, name)
    if name not in _KV_DTYPES:
        raise ValueError(f"unknown kv_cache_dtype {name!r}; use auto or one of {sorted(_KV_DTYPES)}")
    return _KV_DTYPES[name]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    name = DTYPE_ALIASES.get(name, name)
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use auto or one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@contextmanager
def _building(dtype: torch.dtype, device: torch.device) -> Iterator[None]:
    """Create parameters directly in the target dtype on the target device (no fp32 detour)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(old)


def _packed_on(device: torch.device) -> bool:
    """Whether 4-bit checkpoints stay packed on ``device`` (CUDA: the Triton kernels); elsewhere they
    are dequantized while they load. (Tests build packed layers on the CPU by patching this.)"""
    return device.type == "cuda"


def build_model(model_config: Any, dtype: torch.dtype, device: torch.device, context_len: int,
                quantization: Optional[str] = None) -> ModelBase:
    """The model class of ``model_config`` (``models.registry``), its parameters uninitialized. On
    CUDA, an AWQ/GPTQ checkpoint (or ``quantization="awq"|"gptq"`` with random weights) builds
    4-bit linear layers (``quant/int4_linear.py``), but for those its ``modules_to_not_convert``
    keeps dense; an FP8 checkpoint or ``quantization="fp8"`` builds FP8 ones (``fp8.py``). The
    model remembers ``quantization`` (``load_checked`` builds its meta copy with it)."""
    cfg = int4_format.int4_config(model_config, quantization) if _packed_on(device) else None
    scheme = fp8.fp8_scheme(model_config, quantization)
    with _building(dtype, device), quantized_layers(None if cfg is None else Int4Method(cfg)), fp8.building(scheme):
        model = get_model_class(model_config)(model_config, max_positions=context_len)
    restore_dense(model, dtype)
    fp8_ignored.restore_ignored(model, scheme)
    model.quantization = quantization
    return model


def load_weights(model: ModelBase, model_dir: str, load_format: str, model_config: Any, seed: int,
                 init_std: float) -> None:
    """Fill ``model``: the checkpoint's safetensors (``auto``/``safetensors``; AWQ/GPTQ layers go
    packed to 4-bit layers, or arrive dequantized where the model has none) or seeded random
    weights (``dummy``, N(0, ``init_std``)); then inference mode."""
    if load_format == "dummy":
        init_dummy_weights(model, seed, init_std)
        fp8.dummy_weights(model, seed, init_std)
    elif load_format in ("auto", "safetensors"):
        keep, q = model.wants_tensor, int4_format.int4_config(model_config)
        weights = iter_safetensors(model_dir, keep=keep if q is None else int4_format.keeps(keep, q),
                                   lazy=model.lazy_weights)
        if q is not None:
            weights = int4_format.packed(weights, q) if int4_layers(model) else int4_format.dequantized(weights, q)
        if fp8.fp8_layers(model) or fp8_ignored.mixed_layers(model):
            weights = fp8.checkpoint_tensors(weights)
        model.load_weights(weights)
        fp8_ignored.check_paired(model)
    else:
        raise ValueError(f"unknown load_format {load_format!r}")
    finish_int4(model)
    fp8.finish(model)  # off CUDA: FP8 layers run on their dequantized weights
    model.eval().requires_grad_(False)


def refuse_int4_update(model_config: Any, quantization: Optional[str]) -> None:
    """New weights for an AWQ/GPTQ model are a ValueError (on every device: the CPU serves it
    dequantized, but the same call must not work there and fail on the GPU). A trainer holds float
    weights, and turning them into 4-bit codes again takes the quantizer's calibration (AWQ's
    activation scales, GPTQ's second-order updates from calibration data), not a rounding a
    weight loader can do."""
    cfg = int4_format.int4_config(model_config, quantization)
    if cfg is not None:
        raise ValueError(f"updating the weights of a 4-bit ({cfg.method.upper()}) model is not supported: a trainer "
                         "has float weights, not 4-bit ones, and quantizing them to 4 bits again needs the "
                         f"{cfg.method.upper()} calibration pass; serve the float checkpoint for RL, or "
                         "quantization='fp8' (float updates are quantized as they load)")


def load_checked(model: ModelBase, model_config: Any, context_len: int, device: torch.device,
                 load: Callable[[ModelBase], Any], phase: str = "both") -> None:
    """``load(model)`` of new weights, in place (so CUDA graphs and every view of the weights stay
    valid), after ``load`` ran on a copy of the model on the meta device: every name, shape and
    completeness check of a real load, without memory. New weights that fail them raise here on
    every tensor-parallel rank (the ranks never serve different weights), and the old ones serve on.
    FP8 layers quantize new float weights as a load does (``fp8.py``); a 4-bit model is refused
    (``refuse_int4_update``). ``phase`` "check" stops after the check, "apply" skips it (the
    update passed it before, on every DP group: runtime/messages.WEIGHT_PHASES)."""
    if phase == "apply":
        load(model)
        return
    quantization = getattr(model, "quantization", None)
    refuse_int4_update(model_config, quantization)
    error = ""
    try:
        dtype = next(model.parameters()).dtype
        meta = build_model(model_config, dtype, torch.device("meta"), context_len, quantization)
        load(meta)
        fp8_ignored.check_paired(meta)  # an FP8 part of a layer kept float came with its scale
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        error = f"{type(e).__name__}: {e}"
    failed = first_failed_rank(bool(error), device)
    if failed is not None:
        raise ValueError(error or f"the new weights failed their check on worker rank {failed} (its log says why)")
    if phase == "both":
        load(model)


def reload_weights(model: ModelBase, model_dir: str, load_format: Optional[str], model_config: Any,
                   context_len: int, device: torch.device, phase: str = "both") -> bool:
    """A new checkpoint of the same model into ``model``'s parameters (``load_checked``); an
    "apply" reads the files again (nothing is kept between the phases)."""
    if phase == "drop":
        return True
    load_format = load_format or "auto"
    refuse_int4_update(model_config, getattr(model, "quantization", None))
    if load_format not in ("auto", "safetensors"):
        raise ValueError(f"load_format {load_format!r} cannot update weights; use 'auto' or 'safetensors'")
    load_checked(model, model_config, context_len, device,
                 lambda m: load_weights(m, model_dir, load_format, model_config, 0, 0.0), phase)
    return True


def select_gemv(model: ModelBase, device: torch.device, gemv_backend: Optional[str]) -> None:
    """One-token products on the Triton GEMV (``gemv_backend="triton"``, or by default where PDL
    exists, i.e. Hopper and later) instead of cuBLAS; CUDA only."""
    pdl = pdl_supported(device)
    if device.type == "cuda" and (gemv_backend == "triton" or gemv_backend is None and pdl):
        use_triton_gemv(model, pdl)
        fp8.use_pdl(model, pdl)  # FP8 layers always take their own Triton GEMV; PDL as the others


def claim_device(name: str) -> torch.device:
    """``name`` as a device; a CUDA one with its index, made the current device."""
    device = torch.device(name)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device
