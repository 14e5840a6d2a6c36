"""Does programmatic dependent launch (PDL) hide the fixed cost of batch-1 GEMVs?  A probe.

    python bench/pdl_bench.py [--layers 32]

At batch 1 an 8B decode step is ~130 GEMVs in a row, each a separate kernel. On an H100 the
small ones stream their weight at 2.0-2.4 TB/s against 2.86 for the large ones (docs/perf.md):
a kernel pays a few microseconds to fill the memory pipe and drain it, and the next kernel
starts only after the last one has finished. With PDL (Hopper) a kernel is launched while its
predecessor runs: it loads the start of its own weight (which depends on nothing), then waits
(``gdc_wait``) for the predecessor's output before reading its input vector.

Times, in one CUDA graph, a chain of Llama-3.1-8B layers' four projections (qkv -> o -> gate_up
-> down, each reading the previous output), every layer its own weights:
  cublas       F.linear
  triton       the 2-D-accumulator GEMV, launched normally
  triton_pdl   the same kernel launched with PDL, PREFETCH weight tiles loaded before the wait
and the same three with a small elementwise kernel after each GEMV (as the norms, RoPE and
SiLU-and-mul sit between the model's GEMVs). The PDL chain must give the same bits as the
plain Triton chain (a race would show as a difference).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from gemv_bench import time_graph  # this directory is on sys.path when the script runs

# name: (N, K, BLOCK_N, BLOCK_K, num_warps): the best 2-D-accumulator configs on an H100 (gemv_bench)
LAYER = [("qkv", 6144, 4096, 8, 256, 4), ("o", 4096, 4096, 8, 512, 8),
         ("gate_up", 28672, 4096, 16, 256, 4), ("down", 4096, 14336, 8, 512, 8)]


@triton.jit
def _gemv(x_ptr, w_ptr, out_ptr, n, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          PDL: tl.constexpr, PREFETCH: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n
    cols = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows[:, None].to(tl.int64) * K
    if PDL:
        gdc_launch_dependents()  # every program has started: the next kernel may be placed now
    w0 = tl.load(w_rows + cols[None, :], mask=row_mask[:, None], other=0.0, eviction_policy="evict_first")
    if PREFETCH > 1:
        w1 = tl.load(w_rows + BLOCK_K + cols[None, :], mask=row_mask[:, None], other=0.0, eviction_policy="evict_first")
    if PDL:
        gdc_wait()  # the predecessor's output (our x) is complete and visible from here on
    acc = w0.to(tl.float32) * tl.load(x_ptr + cols).to(tl.float32)[None, :]
    if PREFETCH > 1:
        acc += w1.to(tl.float32) * tl.load(x_ptr + BLOCK_K + cols).to(tl.float32)[None, :]
    for k0 in range(PREFETCH * BLOCK_K, K, BLOCK_K):
        w = tl.load(w_rows + k0 + cols[None, :], mask=row_mask[:, None], other=0.0, eviction_policy="evict_first")
        acc += w.to(tl.float32) * tl.load(x_ptr + k0 + cols).to(tl.float32)[None, :]
    tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _scale(x_ptr, n, PDL: tl.constexpr, BLOCK: tl.constexpr):
    """x *= 0.5 in place: a stand-in for the model's small kernels (norm, RoPE, SiLU-and-mul)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(x_ptr + offs, x * 0.5, mask=offs < n)


def build(layers: int, small: bool, kind: str, prefetch: int = 1):
    """A chain over ``layers`` layers; returns (fn(i) for time_graph, output buffer)."""
    torch.manual_seed(0)
    weights = [[torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _, n, k, *_ in LAYER]
               for _ in range(layers)]
    bufs = [torch.empty(n, device="cuda", dtype=torch.bfloat16) for _, n, *_ in LAYER]
    x0 = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    pdl = kind == "triton_pdl"

    def step(_: int) -> None:
        x = x0
        for ws in weights:
            for (name, n, k, bn, bk, warps), w, out in zip(LAYER, ws, bufs):
                if kind == "cublas":
                    torch.mm(x[:k].view(1, k), w.t(), out=out.view(1, n))  # as F.linear calls cuBLAS
                else:
                    _gemv[(triton.cdiv(n, bn),)](x, w, out, n, K=k, BLOCK_N=bn, BLOCK_K=bk, PDL=pdl, PREFETCH=prefetch,
                                                 num_warps=warps, launch_pdl=pdl)
                if small:
                    _scale[(1,)](out, min(n, 4096), PDL=pdl, BLOCK=4096, num_warps=4, launch_pdl=pdl)
                x = out
    return step, bufs[-1], weights


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=32)
    a = p.parse_args()
    gb = sum(n * k * 2 for _, n, k, *_ in LAYER) * a.layers / 1e9
    print(f"{torch.cuda.get_device_name()}: {a.layers} layers x (qkv, o, gate_up, down), {gb:.2f} GB of weights a pass")
    for small in (False, True):
        outs = {}
        for kind, prefetch in (("cublas", 1), ("triton", 1), ("triton_pdl", 1), ("triton_pdl", 2)):
            step, out, weights = build(a.layers, small, kind, prefetch)
            us = time_graph(step, 1)
            step(0)
            torch.cuda.synchronize()
            outs[(kind, prefetch)] = out.clone()
            label = f"{kind}{'' if prefetch == 1 else f' prefetch {prefetch}'}{' + small kernels' if small else ''}"
            print(f"{label:36s} {us / 1000:7.3f} ms a pass ({gb / us * 1e3:.2f} TB/s), "
                  f"{us / a.layers:6.1f} us a layer", flush=True)
            del weights, step
            torch.cuda.empty_cache()
        ref = outs[("triton", 1)]
        for key, o in outs.items():
            same = torch.equal(o, ref)
            close = torch.allclose(o.float(), ref.float(), atol=1e-2, rtol=1e-2)
            print(f"  {key}: {'same bits as triton' if same else 'close to triton' if close else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
