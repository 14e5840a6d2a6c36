"""Gemma's fused kernels (``triton_gemma.py``) against the layers' torch code: the ``(1 + w)``
RMSNorm with and without the residual add (also on q/k heads cut from a strided qkv output) and
GELU(tanh)-and-mul, in Triton's CPU interpreter (a subprocess, float32) and on CUDA; and the
fused RoPE + K/V store at Gemma 3's head dim of 256."""

from __future__ import annotations

import json
import sys
from typing import Callable

import pytest
import torch

from test_fused_ops import Pair, check_pair, rope_kv_case
from treadle.gpu_worker.layers.activation import GeluAndMul
from treadle.gpu_worker.layers.norm import GemmaRMSNorm


def _ops():
    from treadle.gpu_worker.layers import triton_gemma

    return triton_gemma


def norm_case(n: int, t: int, residual: bool, heads: int = 0) -> Callable[[str, torch.dtype], Pair]:
    """``heads``: normalize ``[t, heads, n]`` head slices of a strided ``[t, 3 * heads * n]`` output."""
    def run(device: str, dtype: torch.dtype) -> Pair:
        gen = torch.Generator().manual_seed(n + t + heads)
        norm = GemmaRMSNorm(n, 1e-6).to(device)
        norm.weight.data.copy_(torch.randn(n, generator=gen) * 0.5)
        if heads:
            x = (torch.randn(t, 3 * heads * n, generator=gen) * 3).to(device, dtype)[:, : heads * n]
            x = x.unflatten(-1, (heads, n))
        else:
            x = (torch.randn(t, n, generator=gen) * 3).to(device, dtype)
        r = (torch.randn(t, n, generator=gen)).to(device, dtype) if residual else None
        got = _ops().gemma_rms_norm(x, norm.weight, norm.eps, r)
        want = norm.forward_torch(x, r)
        return (got,) if r is None else got, (want,) if r is None else want
    return run


def gelu_case(n: int, t: int) -> Callable[[str, torch.dtype], Pair]:
    def run(device: str, dtype: torch.dtype) -> Pair:
        gen = torch.Generator().manual_seed(n * 3 + t)
        x = (torch.randn(t, 2 * n, generator=gen) * 3).to(device, dtype)
        return (_ops().gelu_tanh_and_mul(x),), (GeluAndMul("tanh").forward_torch(x),)
    return run


CASES: dict[str, Callable[[str, torch.dtype], Pair]] = {}
for _n in (64, 3840):
    for _t in (0, 1, 7):
        CASES[f"norm-{_n}-T{_t}"] = norm_case(_n, _t, False)
        CASES[f"norm_add-{_n}-T{_t}"] = norm_case(_n, _t, True)
        CASES[f"gelu_mul-{_n}-T{_t}"] = gelu_case(_n, _t)
CASES["qk_norm-256-h16-T5"] = norm_case(256, 5, False, heads=16)
# Gemma 3's heads of 256 through the fused RoPE + K/V store (test_fused_ops covers 64 and 128)
CASES["rope_kv-d256-q16-k8-T5"] = rope_kv_case(256, 16, 8, 5)
CASES["gelu_mul-15360-T2"] = gelu_case(15360, 2)


@pytest.fixture(scope="module")
def interpreted() -> dict[str, str]:
    from kernel_helpers import interpret_script

    return interpret_script(__file__)


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_kernel_matches_torch(interpreted: dict[str, str], name: str):
    assert interpreted[name] == "", interpreted[name]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_kernel_matches_torch(name: str, dtype: torch.dtype):
    tol = {} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    assert check_pair(CASES[name]("cuda", dtype), **tol) == ""


if __name__ == "__main__":  # the interpreter run: float32 on the CPU, one JSON line of messages
    print(json.dumps({name: check_pair(case("cpu", torch.float32), atol=1e-5, rtol=1e-5) for name, case in CASES.items()}))
    sys.exit(0)
