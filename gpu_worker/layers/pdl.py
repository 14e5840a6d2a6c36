"""Programmatic dependent launch (PDL, Hopper and later): a kernel starts before its predecessor ends.

A kernel launched with ``launch_pdl=True`` may be placed on the GPU as soon as every program of
the kernel before it has called ``allow_dependents`` (or exited); it must call ``gdc_wait`` before
it reads anything an earlier kernel writes. At batch-1 decode a step is a chain of ~400 short
kernels, and PDL takes the launch gap between each pair off the critical path:

- the one-token GEMV (``triton_gemv.py``) loads its first weight tile before it waits;
- the other kernels of the decode chain (RMSNorm, SiLU-and-mul, RoPE, the K/V store, decode
  attention, the fused all-reduce + norm) start with ``pdl_start``: allow, then wait.

A kernel not launched with PDL (cuBLAS, torch ops) still starts only after its predecessor has
finished, so mixing is correct as long as nothing a PDL kernel reads before its wait is written
by a kernel: here that is only the GEMV's weight and bias.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:  # grid dependency control; Triton releases without it get no PDL
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - depends on the installed Triton
    gdc_launch_dependents = gdc_wait = None

__all__ = ["allow_dependents", "gdc_wait", "pdl_launch", "pdl_start", "pdl_supported"]

# TREADLE_DISABLE_PDL=1 launches every kernel plainly (a check that PDL changes no result)
ENABLED = os.environ.get("TREADLE_DISABLE_PDL", "") in ("", "0")


@functools.lru_cache(maxsize=None)
def _capable(index: int) -> bool:
    return gdc_wait is not None and torch.cuda.get_device_capability(index) >= (9, 0)


def pdl_supported(device: torch.device) -> bool:
    """Whether kernels on ``device`` can use PDL: a Hopper-or-later GPU and a Triton that has it."""
    if not ENABLED or device.type != "cuda" or gdc_wait is None:
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def pdl_launch(pdl: bool) -> dict:
    """The keyword arguments of a launch, with or without PDL: the kernel's ``PDL`` constexpr and,
    with PDL, Triton's ``launch_pdl`` option (a Triton without PDL does not know it)."""
    return {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """First thing in a kernel launched with PDL that needs its predecessor's output from the
    start: let the next kernel start, then wait until every earlier kernel's writes are complete
    and visible. Every program of such a kernel must call it, so the kernel ends only after its
    predecessor has (which makes the order transitive down the chain)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


@triton.jit
def allow_dependents(PDL: tl.constexpr):
    """Let the next kernel, if launched with PDL, start now (it waits for this one to finish
    before reading our output). A no-op when ``PDL`` is False."""
    if PDL:
        gdc_launch_dependents()
