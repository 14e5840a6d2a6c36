"""4-bit (AWQ/GPTQ) products on the GPU against bf16 cuBLAS, per projection, with the tiles in force.

    PYTHONPATH=$PWD python bench/kernels/int4_bench.py [--ms 1,2,4,16,64,256,1024,4096] [--shapes ...]

For each shape and row count M: bf16 cuBLAS (``F.linear``) on a dense weight, and
``int4_matmul`` (``layers/triton_int4.py``, group 128 with zero points, as AWQ) with the tile
``int4_tiles.choose`` gives (the table that ``int4_sweep.py`` wrote, else the heuristic):
microseconds a call and the weight bandwidth (bytes the format reads: 2 a weight for bf16, about
0.52 for int4 with its scales and zeros). Unlike the sweep, it also has TP-2 and 70B shapes (the
heuristic's ground). Each call reads its own weight copy (out of L2's reach), all inside one
CUDA graph (``gemv_bench.time_graph``).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from gemv_bench import time_graph
from int4_sweep import GROUP, packed
from treadle.gpu_worker.layers.int4_tiles import choose
from treadle.gpu_worker.layers.triton_int4 import int4_matmul

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "tp2 gate_up": (14336, 4096), "tp2 down": (4096, 7168), "70b gate_up": (57344, 8192)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ms", default="1,2,4,8,16,32,64,128,256,1024,4096")
    p.add_argument("--shapes", default="", help="comma-separated names from SHAPES (default: all)")
    a = p.parse_args()
    ms = [int(m) for m in a.ms.split(",")]
    print(f"{torch.cuda.get_device_name()}: us a call (TB/s of weight bytes read)")
    for name in [s for s in a.shapes.split(",") if s] or list(SHAPES):
        n, k = SHAPES[name]
        q_bytes = n * k // 2 + (k // GROUP) * n * 3
        copies = max(2, -(-(1 << 30) // q_bytes))
        qs = packed(n, k, copies)
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(max(2, copies // 4))]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            cublas = time_graph(lambda i: F.linear(x, dense[i % len(dense)]), copies)
            us = time_graph(lambda i: int4_matmul(x, *qs[i][:2], qs[i][2], GROUP), copies)
            print(f"{name:12s} M={m:5d} {n}x{k}: bf16 cuBLAS {cublas:8.1f} ({n * k * 2 / cublas / 1e6:.2f})  "
                  f"int4 {us:8.1f} ({q_bytes / us / 1e6:.2f})  {choose(m, n, k)}", flush=True)
        qs = dense = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
