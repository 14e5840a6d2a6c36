"""The triton attention backend against the torch reference (TorchNativeBackend, float32).

Every case shuffles KV locations, fills the whole cache with noise (so a read outside a row's
positions shows) and mixes decode rows (one new token) with extend rows (several, with or
without a cached prefix). Without a GPU the kernels run in Triton's CPU interpreter: that needs
TRITON_INTERPRET=1 before triton decorates them and must not leak into this process (the CUDA
tests compile the real kernels), so those cases run as this file's ``__main__`` in a subprocess.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from kernel_helpers import interpreter_runs_loops  # noqa: E402
from treadle.gpu_worker.attention.torch_native import TorchNativeBackend  # noqa: E402
from treadle.gpu_worker.attention.triton_backend import TritonBackend  # noqa: E402
from treadle.gpu_worker.forward_context import ForwardContext  # noqa: E402
from treadle.gpu_worker.kv_cache import KVCache  # noqa: E402
from treadle.gpu_worker.layers.attention import Attention  # noqa: E402

LAYER = 1  # of 2: a non-zero layer checks the per-layer views


class Case:
    """A step of ``rows`` = [(start, n)] over a noisy cache with permuted locations."""

    def __init__(self, rows, h, hkv, d, device="cpu", seed=0, graph_pad=0, num_locs=0, context_len=0):
        gen = torch.Generator().manual_seed(seed)
        rnd = random.Random(seed)
        self.rows, self.device = rows, device
        self.layer = Attention(h, hkv, d, d ** -0.5, LAYER)
        num_locs = num_locs or sum(s + n for s, n in rows) + 37
        self.context_len = context_len or max(s + n for s, n in rows) + 8
        perm = torch.randperm(num_locs, generator=gen)
        self.slots = rnd.sample(range(len(rows) + 4), len(rows))
        r2t = torch.zeros(len(rows) + 4, self.context_len, dtype=torch.int64)
        new_locs, off = [], 0
        for slot, (s, n) in zip(self.slots, rows):
            r2t[slot, : s + n] = perm[off : off + s + n]
            new_locs.append(perm[off + s : off + s + n])
            off += s + n
        t = sum(n for _, n in rows)
        self.kv = torch.randn(2, 2, num_locs, hkv, d, generator=gen)
        self.q = torch.randn(t + graph_pad, h, d, generator=gen)  # graph_pad: padded decode rows
        self.k = torch.randn(t, hkv, d, generator=gen)
        self.v = torch.randn(t, hkv, d, generator=gen)
        self.out_loc, self.r2t = torch.cat(new_locs), r2t

    def ctx(self, backend, dtype):
        """A fresh cache + context in ``dtype`` on the case's device."""
        cache = KVCache(2, self.kv.shape[2], self.kv.shape[3], self.kv.shape[4], dtype, self.device)
        cache.buf.copy_(self.kv.to(dtype))
        dev = self.device
        return ForwardContext(
            input_ids=torch.zeros(self.k.shape[0], dtype=torch.int64, device=dev), positions=None,
            out_cache_loc=self.out_loc.to(dev), slots=self.slots, starts=[s for s, _ in self.rows],
            extend_lens=[n for _, n in self.rows], logits_indices=None, req_to_token=self.r2t.to(dev),
            kv_cache=cache, attn_backend=backend)

    def run(self, backend, dtype):
        ctx = self.ctx(backend, dtype)
        ctx.attn_meta = backend.init_forward(ctx)
        t = self.k.shape[0]
        q, k, v = (x.to(self.device, dtype) for x in (self.q[:t], self.k, self.v))
        return backend.forward(q, k, v, self.layer, ctx).float().cpu()

    def reference(self):
        return self.run(TorchNativeBackend(), torch.float32)

    def graph_ctx(self, backend, dtype):
        """Decode-only rows through the graph metadata, padded with ``graph_pad`` dummy rows
        (slot 0, seq_len 1) as the runner does; returns (ctx, q)."""
        assert all(n == 1 for _, n in self.rows)
        ctx = self.ctx(backend, dtype)
        ctx.kv_cache.store(LAYER, ctx.out_cache_loc, self.k.to(self.device, dtype), self.v.to(self.device, dtype))
        bs = self.q.shape[0]
        backend.init_cuda_graph_state(bs + 3, self.context_len)
        ctx.attn_meta = backend.graph_decode_meta(bs)
        return ctx, self.q.to(self.device, dtype)

    def fill(self, backend, pad_to: int):
        pad = pad_to - len(self.rows)
        slots = torch.tensor(self.slots + [0] * pad, dtype=torch.int64, device=self.device)
        lens = torch.tensor([s + 1 for s, _ in self.rows] + [1] * pad, dtype=torch.int32, device=self.device)
        backend.fill_graph_decode(pad_to, slots, lens)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---- the CPU interpreter (float32): small shapes, run as a subprocess ----

INTERP_CASES = {  # name: (rows [(start, n)], heads, kv heads, head dim, backend.num_sms)
    "mixed_gqa2_d64": ([(0, 37), (0, 1), (21, 1), (50, 9), (13, 40)], 4, 2, 64, 4),
    "gqa8_d128": ([(0, 5), (70, 1), (100, 33)], 8, 1, 128, 4),
    "mha_d32": ([(5, 1), (0, 3), (2, 2)], 2, 2, 32, 4),
    "gqa4_d80_prefix": ([(30, 20), (9, 1), (64, 2)], 4, 1, 80, 4),
    "long_decode_16_splits": ([(300, 1), (1000, 1), (2, 1)], 4, 1, 64, 64),
    "long_decode_3_splits": ([(300, 1), (1000, 1), (2, 1)], 2, 1, 64, 4),
    # a batch that fills the (2-SM) GPU twice: only rows longer than 512 positions split, up to 4 ways
    "full_gpu_long_rows": ([(2100, 1), (1700, 1), (40, 1), (600, 1), (511, 1)], 4, 1, 64, 2),
}


def _random_cases(count: int, seed: int = 1234) -> dict:
    rnd = random.Random(seed)
    cases = {}
    for i in range(count):
        g, hkv, d = rnd.choice([1, 2, 4, 8]), rnd.choice([1, 2]), rnd.choice([32, 64, 80, 96, 128])
        rows = [(rnd.choice([0, rnd.randrange(1, 150)]), rnd.choice([1, 1, rnd.randrange(2, 70)]))
                for _ in range(rnd.randrange(1, 6))]
        cases[f"random{i}_g{g}_d{d}"] = (rows, g * hkv, hkv, d, rnd.choice([4, 64]))
    return cases


INTERP_CASES.update(_random_cases(12))


def _interp_main() -> int:
    """Run every interpreter case; print one line each; exit status = number of failures."""
    torch.manual_seed(0)
    fails = 0
    for i, (name, (rows, h, hkv, d, sms)) in enumerate(INTERP_CASES.items()):
        t0 = time.time()
        case = Case(rows, h, hkv, d, seed=i)
        be = TritonBackend(device="cpu", dtype=torch.float32)
        be.num_sms = sms
        err = _max_err(case.run(be, torch.float32), case.reference())
        ok = err < 1e-4
        fails += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: max err {err:.2e} ({time.time() - t0:.1f} s)", flush=True)
    # Graph metadata path: decode rows padded to 5, against eager on the same rows.
    case = Case([(10, 1), (200, 1), (0, 1)], 4, 2, 64, seed=9, graph_pad=2)
    be = TritonBackend(device="cpu", dtype=torch.float32)
    ctx, q = case.graph_ctx(be, torch.float32)
    case.fill(be, 5)
    got = be.attend(q, case.layer, ctx)[:3]
    err = _max_err(got, case.reference())
    fails += err >= 1e-4
    print(f"{'ok  ' if err < 1e-4 else 'FAIL'} graph_meta: max err {err:.2e}", flush=True)
    return fails


@pytest.mark.skipif(not interpreter_runs_loops(), reason="this triton's interpreter fails on numpy >= 2.4")
def test_kernels_in_interpreter():
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr


def test_decode_split_policy():
    """Small batches split every row to fill the SMs; a batch whose (row, KV head) programs cover
    the SMs twice splits only rows over 512 positions, at most 4 ways."""
    be = TritonBackend(device="cpu", dtype=torch.float32)
    be.num_sms = 132
    assert be._num_splits(1, 8, 544) == (9, 64)  # batch 1: 64-position splits of the row
    assert be._num_splits(20, 8, 10_000) == (2, 64)  # 160 programs: two splits each
    assert be._num_splits(33, 8, 10_000) == (4, 512)
    assert be._num_splits(96, 8, 300) == (1, 512)


# ---- CUDA: bf16 and fp32, bigger shapes, a captured graph ----

CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
TOL = {torch.float32: (2e-3, 1e-4), torch.bfloat16: (4e-2, 3e-3)}  # (max, mean) abs error vs fp32
ROWS = [(0, 700), (0, 1), (4000, 1), (1500, 300), (20000, 1), (33, 1), (2047, 129), (100, 2), (0, 5)]


def _check(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """bf16 rounds outputs near 1.5 by up to 4e-3 and P by more: a max bound for outliers plus a
    tight mean bound that a systematic error (a wrong mask, a lost split) would break."""
    err = (got - ref).abs()
    assert err.max().item() < TOL[dtype][0] and err.mean().item() < TOL[dtype][1], (err.max(), err.mean())


SHAPES = [(8, 8, 128), (16, 8, 64), (32, 8, 128), (32, 4, 128), (8, 2, 80), (16, 2, 64), (8, 1, 256)]


@pytest.mark.parametrize("dtype,h,hkv,d", [(torch.bfloat16, *s) for s in SHAPES] +
                         [(torch.float32, *s) for s in [(8, 8, 128), (32, 4, 128), (8, 2, 80)]])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA)])
def test_cuda_mixed(device, dtype, h, hkv, d):
    case = Case(ROWS, h, hkv, d, device=device, seed=h * 1000 + hkv * 10 + d)
    _check(case.run(TritonBackend(device=device, dtype=dtype), dtype), case.reference(), dtype)


@pytest.mark.parametrize("rows", [[(500, 8), (0, 3), (1000, 16), (3, 1)], [(64, 32), (0, 20), (7, 1)]],
                         ids=["block16", "block32"])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA)])
def test_cuda_short_extends(device, rows):
    """Speculative-decoding-sized extends take the short query blocks."""
    case = Case(rows, 32, 8, 128, device=device, seed=len(rows))
    _check(case.run(TritonBackend(device=device, dtype=torch.bfloat16), torch.bfloat16), case.reference(),
           torch.bfloat16)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA)])
def test_cuda_full_batch_decode(device):
    """A decode batch that fills the GPU by itself (the long-row splits: rows over 512 positions
    split up to 4 ways, the rest in one program), lengths from 1 to 5,000."""
    rnd = random.Random(5)
    rows = [(rnd.choice([0, 3, 511, 512, 513, 1500, 2049, 4999, rnd.randrange(5000)]), 1) for _ in range(96)]
    case = Case(rows, 32, 8, 128, device=device, seed=96)
    be = TritonBackend(device=device, dtype=torch.bfloat16)
    assert be._num_splits(len(rows), 8, 5000) == (4, 512)
    _check(case.run(be, torch.bfloat16), case.reference(), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA)])
def test_cuda_graph_decode(device, dtype):
    """Capture at one batch, replay with other slots, lengths and queries; matches the reference."""
    kw = dict(h=32, hkv=8, d=128, device=device, graph_pad=2, num_locs=20000, context_len=13000)
    a = Case([(5000, 1), (10, 1), (0, 1), (300, 1)], seed=1, **kw)
    b = Case([(77, 1), (12000, 1), (3, 1), (1, 1)], seed=2, **kw)
    be = TritonBackend(device=device, dtype=dtype)
    ctx, q = a.graph_ctx(be, dtype)
    a.fill(be, 6)
    static_q = q.clone()
    be.attend(static_q, a.layer, ctx)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = be.attend(static_q, a.layer, ctx)
    graph.replay()
    _check(static_out[:4].float().cpu(), a.reference(), dtype)
    # Another step's data into the captured buffers (cache, table, queries, static metadata).
    ctx_b, q_b = b.graph_ctx(TritonBackend(device=device, dtype=dtype), dtype)
    ctx.kv_cache.buf.copy_(ctx_b.kv_cache.buf)
    ctx.req_to_token.copy_(ctx_b.req_to_token)
    static_q.copy_(q_b)
    b.fill(be, 6)
    graph.replay()
    _check(static_out[:4].float().cpu(), b.reference(), dtype)

if __name__ == "__main__":
    sys.exit(_interp_main())
