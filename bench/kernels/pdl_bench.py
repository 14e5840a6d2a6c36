"""Does programmatic dependent launch (PDL) hide the fixed cost of batch-1 GEMVs?  A probe.

    python bench/kernels/pdl_bench.py [--layers 32]

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
  triton_pdl   the same kernel launched with PDL (its first weight tile loaded before the wait)
and the same three with a small elementwise kernel after each GEMV (as the norms, RoPE and
SiLU-and-mul sit between the model's GEMVs). The PDL chain must give the same bits as the
plain Triton chain (a race would show as a difference).
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from gemv_bench import time_graph  # this directory is on sys.path when the script runs
from treadle.gpu_worker.layers.pdl import allow_dependents
from treadle.gpu_worker.layers.triton_gemv import gemv, gemv_config

LAYER = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]


@triton.jit
def _scale(x_ptr, n, PDL: tl.constexpr, BLOCK: tl.constexpr):
    """x *= 0.5 in place: a stand-in for the small kernels before the model's GEMVs (norms,
    SiLU-and-mul), which let the next GEMV start early as they do."""
    allow_dependents(PDL)
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(x_ptr + offs, x * 0.5, mask=offs < n)


def build(layers: int, small: bool, kind: str):
    """A chain over ``layers`` layers: (fn(i) for time_graph, a list holding the last output)."""
    torch.manual_seed(0)
    weights = [[torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _, n, k in LAYER]
               for _ in range(layers)]
    bufs = [torch.empty(1, n, device="cuda", dtype=torch.bfloat16) for _, n, _ in LAYER]
    x0 = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    pdl, last = kind == "triton_pdl", []

    def step(_: int) -> None:
        x = x0
        for ws in weights:
            for (name, n, k), w, out in zip(LAYER, ws, bufs):
                if kind == "cublas":
                    torch.mm(x[:, :k], w.t(), out=out)  # as F.linear calls cuBLAS
                else:
                    out = gemv(x[:, :k], w, gemv_config(n, k, pdl))
                if small:
                    _scale[(1,)](out, min(n, 4096), PDL=pdl, BLOCK=4096, num_warps=4)
                x = out
        last[:] = [x]
    return step, last


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=32)
    a = p.parse_args()
    gb = sum(n * k * 2 for _, n, k in LAYER) * a.layers / 1e9
    print(f"{torch.cuda.get_device_name()}: {a.layers} layers x (qkv, o, gate_up, down), {gb:.2f} GB of weights a pass")
    for small in (False, True):
        outs = {}
        for kind in ("cublas", "triton", "triton_pdl"):
            step, last = build(a.layers, small, kind)
            us = time_graph(step, 1)  # the graph's last output is last[0] after each replay
            outs[kind] = last[0].clone()
            label = f"{kind}{' + small kernels' if small else ''}"
            print(f"{label:30s} {us / 1000:7.3f} ms a pass ({gb / us * 1e3:.2f} TB/s), "
                  f"{us / a.layers:6.1f} us a layer", flush=True)
            del step, last
            torch.cuda.empty_cache()
        for kind, o in outs.items():
            same = torch.equal(o, outs["triton"])
            close = torch.allclose(o.float(), outs["triton"].float(), atol=1e-2, rtol=1e-2)
            print(f"  {kind}: {'same bits as triton' if same else 'close to triton' if close else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
