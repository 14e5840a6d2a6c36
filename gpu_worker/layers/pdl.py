"""Programmatic dependent launch (PDL, Hopper and later): a kernel starts before its predecessor ends.

A kernel launched with ``launch_pdl=True`` may be placed on the GPU as soon as every program of
the kernel before it has called ``allow_dependents`` (or exited); it must call ``gdc_wait`` before
it reads anything an earlier kernel writes. The one-token GEMV (``triton_gemv.py``) is launched
this way and loads its first weight tile before the wait; the kernels that run right before the
model's GEMVs (RMSNorm, SiLU-and-mul, the fused all-reduce + norm, decode attention) call
``allow_dependents`` first thing. For any kernel not launched with PDL the call changes nothing.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

try:  # grid dependency control; Triton releases without it get no PDL
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - depends on the installed Triton
    gdc_launch_dependents = gdc_wait = None

__all__ = ["allow_dependents", "gdc_wait", "pdl_supported"]


@functools.lru_cache(maxsize=None)
def _capable(index: int) -> bool:
    return gdc_wait is not None and torch.cuda.get_device_capability(index) >= (9, 0)


def pdl_supported(device: torch.device) -> bool:
    """Whether kernels on ``device`` can use PDL: a Hopper-or-later GPU and a Triton that has it."""
    if device.type != "cuda" or gdc_wait is None:
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def allow_dependents(PDL: tl.constexpr):
    """Let the next kernel, if launched with PDL, start now (it waits for this one to finish
    before reading our output). A no-op when ``PDL`` is False."""
    if PDL:
        gdc_launch_dependents()
