"""Which cuBLAS call is fastest for a one-token projection: a layout survey, per weight shape.

    python bench/kernels/gemv_layouts.py

Batch-1 decode spends ~90% of its GPU time in GEMVs (docs/perf.md), and cuBLAS's heuristics pick
a different kernel for the same product written different ways. For each Llama-3.1-8B shape this
times, inside one CUDA graph:
  linear  F.linear(x[1,K], W[N,K])         (what the model does today)
  mv      torch.mv(W, x[K])
  t_mm    torch.mm(x[1,K], Wt[K,N])        (weight stored transposed)
  pad8    F.linear(x[8,K], W)              (M padded to 8)
Each call reads a different copy of the weight (at least 1 GiB of copies in all), so no call hits
L2 as a repeated single matrix would (an 8B o_proj, 32 MiB, fits the 50 MiB L2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gemv_bench import time_graph  # this directory is on sys.path when the script runs

SHAPES = {  # name: (N, K)
    "qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
    "lm_head": (128256, 4096), "tp2 o": (4096, 2048), "tp2 down": (4096, 7168),
}


def main() -> None:
    print(f"{torch.cuda.get_device_name()}: one-token projections, us a call (TB/s of weight read)")
    for name, (n, k) in SHAPES.items():
        copies = max(2, -(-(1 << 30) // (n * k * 2)))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        wts = [w.t().contiguous() for w in ws]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        x8, x1d = x.expand(8, k).contiguous(), x[0].contiguous()
        ref = F.linear(x, ws[0]).float()
        assert torch.allclose(torch.mm(x, wts[0]).float(), ref, atol=0.5, rtol=2e-2)
        variants = {
            "linear": lambda i: F.linear(x, ws[i]),
            "mv": lambda i: torch.mv(ws[i], x1d),
            "t_mm": lambda i: torch.mm(x, wts[i]),
            "pad8": lambda i: F.linear(x8, ws[i]),
        }
        line = []
        for vname, fn in variants.items():
            us = time_graph(fn, copies)
            line.append(f"{vname} {us:7.1f} ({n * k * 2 / us / 1e6:.2f})")
        print(f"{name:9s} {n}x{k} x{copies}: " + "  ".join(line), flush=True)
        ws = wts = None  # free this shape's copies (the lambdas hold them) before the next shape's
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
