"""The fused Triton kernels (``layers/triton_ops.py``) against the layers' torch code.

Without a GPU the kernels run in Triton's interpreter on CPU float32 tensors. ``TRITON_INTERPRET``
must be set before the kernels are defined and the interpreter patches ``triton.language`` while
it runs, so all interpreter cases run in one child process (this file run as a script) and report
back as JSON; nothing leaks into the pytest process. The ``gpu`` tests run the same cases on CUDA
through the layers' own dispatch, in float32 and bfloat16, plus a CUDA-graph capture.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import pytest
import torch

from kernel_helpers import interpret_script

from treadle.gpu_worker.layers.activation import SiluAndMul
from treadle.gpu_worker.layers.norm import RMSNorm
from treadle.gpu_worker.layers.rotary import QKNormRotary, RotaryEmbedding

Pair = tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]  # (fused outputs, torch outputs)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
DEFAULT = {"rope_type": "default", "rope_theta": 10000.0}


def _ops():
    from treadle.gpu_worker.layers import triton_ops
    return triton_ops


def _randn(gen: torch.Generator, *shape: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(device, dtype)


def norm_case(n: int, t: int, residual: bool, strided: bool = False) -> Callable[[str, torch.dtype], Pair]:
    def run(device: str, dtype: torch.dtype) -> Pair:
        gen = torch.Generator().manual_seed(n * 131 + t)
        m = RMSNorm(n, 1e-5).to(device)
        m.weight.data = (1 + 0.5 * _randn(gen, n, device=device, dtype=torch.float32)).to(dtype)
        x = _randn(gen, t, n + 24 if strided else n, device=device, dtype=dtype)[:, :n]  # a row-strided view
        r = _randn(gen, t, n, device=device, dtype=dtype) if residual else None
        x0, r0 = x.clone(), None if r is None else r.clone()
        got = m(x, r) if x.is_cuda else _ops().rms_norm(x, m.weight, m.eps, r)
        assert torch.equal(x, x0) and (r is None or torch.equal(r, r0)), "inputs were modified"
        want = m.forward_torch(x, r)
        return (got,) if r is None else got, (want,) if r is None else want
    return run


def act_case(n: int, t: int) -> Callable[[str, torch.dtype], Pair]:
    def run(device: str, dtype: torch.dtype) -> Pair:
        x = 3 * _randn(torch.Generator().manual_seed(n + t), t, 2 * n, device=device, dtype=dtype)
        m = SiluAndMul()
        return (m(x) if x.is_cuda else _ops().silu_and_mul(x),), (m.forward_torch(x),)
    return run


def rope_case(head_dim: int, qh: int, kh: int, t: int, params: dict) -> Callable[[str, torch.dtype], Pair]:
    def run(device: str, dtype: torch.dtype) -> Pair:
        gen = torch.Generator().manual_seed(head_dim + qh * 7 + t)
        rope = RotaryEmbedding(head_dim, 4096, params).to(device)
        qkv = _randn(gen, t, (qh + 2 * kh) * head_dim, device=device, dtype=dtype)
        q, k, _ = qkv.split([qh * head_dim, kh * head_dim, kh * head_dim], dim=-1)  # strided views, as in llama
        pos = torch.randint(0, 4096, (t,), generator=gen).to(device)
        qkv0 = qkv.clone()
        got = rope(pos, q, k) if q.is_cuda else _ops().rotary(pos, q, k, rope.cos, rope.sin, head_dim)
        assert torch.equal(qkv, qkv0), "inputs were modified"
        return got, rope.forward_torch(pos, q, k)
    return run


def kv_case(heads: int, head_dim: int, t: int) -> Callable[[str, torch.dtype], Pair]:
    """K and V stored at scattered locations of a 40-token cache; V a strided slice, as in llama."""
    def run(device: str, dtype: torch.dtype) -> Pair:
        gen = torch.Generator().manual_seed(heads * 13 + head_dim + t)
        kv = _randn(gen, t, 3 * heads * head_dim, device=device, dtype=dtype)
        k = kv[:, : heads * head_dim].contiguous().view(t, heads, head_dim)
        v = kv[:, 2 * heads * head_dim:].view(t, heads, head_dim)
        loc = torch.randperm(40, generator=gen)[:t].to(device)
        caches = [torch.zeros(40, heads, head_dim, device=device, dtype=dtype) for _ in range(4)]
        _ops().store_kv(caches[0], caches[1], loc, k, v)
        caches[2].index_copy_(0, loc, k)
        caches[3].index_copy_(0, loc, v)
        return (caches[0], caches[1]), (caches[2], caches[3])
    return run


def rope_kv_case(head_dim: int, qh: int, kh: int, t: int, cache_dtype: torch.dtype | None = None
                 ) -> Callable[[str, torch.dtype], Pair]:
    """RoPE fused with the K/V store (``KVCache.rotate_and_store``): the rotated q, and a 40-token
    cache holding the rotated k and the v at scattered locations, against RoPE's torch code and a
    byte copy into the cache (also right for an FP8 cache)."""
    def run(device: str, dtype: torch.dtype) -> Pair:
        gen = torch.Generator().manual_seed(head_dim * 3 + qh + kh * 5 + t)
        rope = RotaryEmbedding(head_dim, 4096, DEFAULT).to(device)
        qkv = _randn(gen, t, (qh + 2 * kh) * head_dim, device=device, dtype=dtype)
        q, k, v = qkv.split([qh * head_dim, kh * head_dim, kh * head_dim], dim=-1)
        pos = torch.randint(0, 4096, (t,), generator=gen).to(device)
        loc = torch.randperm(40, generator=gen)[:t].to(device)
        cdt = cache_dtype or dtype
        caches = [torch.zeros(40, kh, head_dim, device=device, dtype=cdt) for _ in range(4)]
        qkv0 = qkv.clone()
        got_q = _ops().rotary_store_kv(pos, q, k, v, rope.cos, rope.sin, head_dim, caches[0], caches[1], loc)
        assert torch.equal(qkv, qkv0), "inputs were modified"
        want_q, want_k = rope.forward_torch(pos, q, k)
        for cache, x in ((caches[2], want_k), (caches[3], v)):
            cache.view(torch.uint8).index_copy_(0, loc, x.reshape(t, kh, head_dim).to(cdt).view(torch.uint8))
        as_float = (lambda c: c.float()) if cache_dtype else (lambda c: c)
        return (got_q, *map(as_float, caches[:2])), (want_q, *map(as_float, caches[2:]))
    return run


def rope_variant_case(head_dim: int, qh: int, kh: int, t: int, partial: float, norm: bool, store: bool
                      ) -> Callable[[str, torch.dtype], Pair]:
    """Partial rotary (the last part of each head passes through) and Qwen3's per-head q/k RMSNorm
    in the RoPE kernel, alone or with the K/V store, against ``QKNormRotary``/``RotaryEmbedding``'s torch code."""
    def run(device: str, dtype: torch.dtype) -> Pair:
        gen = torch.Generator().manual_seed(head_dim + qh * 5 + kh + t + int(100 * partial) + norm)
        rope = RotaryEmbedding(head_dim, 4096, {**DEFAULT, "partial_rotary_factor": partial}).to(device)
        extra = {}
        if norm:
            qn, kn = RMSNorm(head_dim, 1e-6).to(device), RMSNorm(head_dim, 1e-6).to(device)
            for m in (qn, kn):
                m.weight.data = (1 + 0.5 * _randn(gen, head_dim, device=device, dtype=torch.float32)).to(dtype)
            rope = QKNormRotary(rope, qn, kn)
            extra = dict(q_weight=qn.weight, k_weight=kn.weight, eps=qn.eps)
        qkv = 3 * _randn(gen, t, (qh + 2 * kh) * head_dim, device=device, dtype=dtype)
        q, k, v = qkv.split([qh * head_dim, kh * head_dim, kh * head_dim], dim=-1)
        pos = torch.randint(0, 4096, (t,), generator=gen).to(device)
        want_q, want_k = rope.forward_torch(pos, q, k)
        if not store:
            table = rope.rotary if norm else rope
            return _ops().rotary(pos, q, k, table.cos, table.sin, head_dim, rope.rot_dim, **extra), (want_q, want_k)
        loc = torch.randperm(40, generator=gen)[:t].to(device)
        caches = [torch.zeros(40, kh, head_dim, device=device, dtype=dtype) for _ in range(4)]
        got_q = rope.rotate_and_store_cuda(pos, q, k, v, caches[0], caches[1], loc)
        caches[2].index_copy_(0, loc, want_k.reshape(t, kh, head_dim))
        caches[3].index_copy_(0, loc, v.reshape(t, kh, head_dim))
        return (got_q, *caches[:2]), (want_q, *caches[2:])
    return run


CASES: dict[str, Callable[[str, torch.dtype], Pair]] = {}
for _n in (576, 1000, 4096):
    for _t in (0, 1, 7, 64):
        CASES[f"norm-{_n}-T{_t}"] = norm_case(_n, _t, False)
        CASES[f"norm_add-{_n}-T{_t}"] = norm_case(_n, _t, True)
        CASES[f"silu_mul-{_n}-T{_t}"] = act_case(_n, _t)
CASES["norm_add-strided-1000-T7"] = norm_case(1000, 7, True, strided=True)
CASES["silu_mul-14336-T3"] = act_case(14336, 3)
for _hd, _qh, _kh in ((64, 9, 3), (128, 32, 8), (128, 14, 2), (64, 4, 4)):
    for _t in (0, 1, 7, 64):
        CASES[f"rope-d{_hd}-q{_qh}-k{_kh}-T{_t}"] = rope_case(_hd, _qh, _kh, _t, DEFAULT)
CASES["rope-llama3-d128-q32-k8-T7"] = rope_case(128, 32, 8, 7, LLAMA3)
for _hd, _qh, _kh, _t in ((64, 9, 3, 1), (128, 32, 8, 7), (128, 4, 1, 33), (64, 4, 4, 0)):
    CASES[f"rope_kv-d{_hd}-q{_qh}-k{_kh}-T{_t}"] = rope_kv_case(_hd, _qh, _kh, _t)
for _hd, _qh, _kh, _t, _partial, _norm in ((128, 8, 2, 7, 0.75, False), (64, 9, 3, 1, 0.5, False),
                                         (128, 32, 8, 7, 1.0, True), (128, 4, 1, 0, 1.0, True),
                                         (64, 4, 2, 33, 0.5, True)):
    for _store in (False, True):
        _kind = ("qknorm_" if _norm else "") + ("rope_kv" if _store else "rope") + ("" if _norm else "_partial")
        CASES[f"{_kind}-d{_hd}-q{_qh}-k{_kh}-T{_t}-p{_partial}"] = rope_variant_case(_hd, _qh, _kh, _t, _partial, _norm,
                                                                                    _store)
for _h, _hd, _t in ((3, 64, 1), (8, 128, 7), (2, 80, 33), (1, 64, 0)):
    CASES[f"store_kv-h{_h}-d{_hd}-T{_t}"] = kv_case(_h, _hd, _t)


def check_pair(pair: Pair, **tol) -> str:
    """'' when the fused outputs match the torch ones, else assert_close's message."""
    got, want = pair
    try:
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype, f"{g.shape} {g.dtype} vs {w.shape} {w.dtype}"
            torch.testing.assert_close(g, w, **tol)
    except AssertionError as e:
        return str(e) or "mismatch"
    return ""


@pytest.fixture(scope="module")
def interpreted() -> dict[str, str]:
    return interpret_script(__file__)


@pytest.mark.parametrize("name", list(CASES) + [f"{n}-bf16-bits" for n in CASES if n.startswith("rope")])
def test_interpreted_kernel_matches_torch(interpreted: dict[str, str], name: str):
    assert interpreted[name] == "", interpreted[name]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# bf16: the kernels round a chain of elementwise ops once where torch rounds after each op.
_TOL = {torch.float32: {}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.gpu
@needs_cuda
def test_cuda_kernel_matches_torch(name: str, dtype: torch.dtype):
    msg = check_pair(CASES[name]("cuda", dtype), **_TOL[dtype])
    assert msg == "", msg


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.gpu
@needs_cuda
def test_cuda_rope_kv_into_fp8_cache(cache_dtype: torch.dtype):
    """An FP8 cache gets the same bytes from the fused kernel as from rounding torch's bf16 K/V."""
    msg = check_pair(rope_kv_case(128, 32, 8, 7, cache_dtype)("cuda", torch.bfloat16), atol=0, rtol=0)
    assert msg == "", msg


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("rope")])
@pytest.mark.gpu
@needs_cuda
def test_cuda_rope_bf16_same_bits_as_torch(name: str):
    """RoPE rounds each product as the torch code does, so in bf16 it gives the very same bits."""
    msg = check_pair(CASES[name]("cuda", torch.bfloat16), atol=0, rtol=0)
    assert msg == "", msg


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_replay():
    """Captured once, replayed on new inputs (positions included): no host syncs, no stale values."""
    dev, dt, n, t = "cuda", torch.bfloat16, 576, 4
    norm, act = RMSNorm(n).to(dev, dt), SiluAndMul()
    rope = RotaryEmbedding(64, 2048, DEFAULT).to(dev)
    x, r = torch.randn(t, n, device=dev, dtype=dt), torch.randn(t, n, device=dev, dtype=dt)
    gu = torch.randn(t, 2 * 1536, device=dev, dtype=dt)
    qkv, pos = torch.randn(t, 15 * 64, device=dev, dtype=dt), torch.zeros(t, dtype=torch.long, device=dev)

    def step():
        q, k, _ = qkv.split([9 * 64, 3 * 64, 3 * 64], dim=-1)
        return (*norm(x, r), act(gu), *rope(pos, q, k))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # compile the kernels outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for src in (x, r, gu, qkv):
        src.normal_()
    pos.copy_(torch.arange(100, 100 + t))
    graph.replay()
    torch.cuda.synchronize()
    q, k, _ = qkv.split([9 * 64, 3 * 64, 3 * 64], dim=-1)
    want = (*norm.forward_torch(x, r), act.forward_torch(gu), *rope.forward_torch(pos, q, k))
    for o, w in zip(outs, want):
        torch.testing.assert_close(o, w, atol=2e-2, rtol=2e-2)


if __name__ == "__main__":  # the interpreter child of `interpreted`
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (set before triton loads)"
    results = {name: check_pair(case("cpu", torch.float32)) for name, case in CASES.items()}
    results.update({f"{name}-bf16-bits": check_pair(case("cpu", torch.bfloat16), atol=0, rtol=0)
                    for name, case in CASES.items() if name.startswith("rope")})
    print(json.dumps(results))
