"""4-bit (AWQ/GPTQ) products on the GPU against bf16 cuBLAS, per Llama-3.1-8B projection.

    python bench/kernels/int4_bench.py [--quick] [--ms 1,2,4,16,64,256,1024,4096] [--shapes ...]

For each shape and row count M: bf16 cuBLAS (``F.linear``) on a dense weight, and
``int4_matmul`` (``layers/triton_int4.py``, group 128 with zero points, as AWQ) on packed ones:
microseconds a call and the weight bandwidth (bytes the format reads: 2 a weight for bf16, about
0.53 for int4 with its scales and zeros). At M = 1 the GEMV's ``GemvLaunch`` grid is swept too
(``--quick``: the default only); from M = 64 on, the Triton GEMM and dequantize + cuBLAS are
both timed, to place ``DEQUANT_MIN_M``. Each call reads its own weight copy (out of L2's reach),
all inside one CUDA graph (``gemv_bench.time_graph``).
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from gemv_bench import time_graph
from treadle.gpu_worker.layers import triton_int4
from treadle.gpu_worker.layers.triton_int4 import int4_matmul
from treadle.gpu_worker.layers.triton_int4_gemv import GEMV, GemvLaunch

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "tp2 gate_up": (14336, 4096), "tp2 down": (4096, 7168), "70b gate_up": (57344, 8192)}
GROUP = 128


def packed(n: int, k: int, copies: int):
    return [(torch.randint(-2 ** 31, 2 ** 31 - 1, (k // 8, n), dtype=torch.int32, device="cuda"),
             torch.full((k // GROUP, n), 0.002, dtype=torch.float16, device="cuda"),
             torch.randint(7, 10, (k // GROUP, n), dtype=torch.uint8, device="cuda")) for _ in range(copies)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="no GEMV grid sweep")
    p.add_argument("--ms", default="1,2,4,8,16,32,64,128,256,1024,4096")
    p.add_argument("--shapes", default="", help="comma-separated names from SHAPES (default: all)")
    a = p.parse_args()
    ms = [int(m) for m in a.ms.split(",")]
    grid = [GemvLaunch(bn, bkw, wp, ps) for bn, bkw, wp, ps in
            itertools.product((32, 64, 128), (8, 16, 32), (4, 8), (2, 4, 8))]
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
            line = f"{name:12s} M={m:5d} {n}x{k}: bf16 cuBLAS {cublas:8.1f} ({n * k * 2 / cublas / 1e6:.2f})"
            runs = {"int4": None}
            if m == 1 and not a.quick:
                runs.update({g: g for g in grid})
            for label, launch in runs.items():
                us = time_graph(lambda i: int4_matmul(x, *qs[i][:2], qs[i][2], GROUP, gemv=launch), copies)
                runs[label] = us
            best = min((g for g in runs if g != "int4"), key=runs.get, default=None)
            line += f"  int4 {runs['int4']:8.1f} ({q_bytes / runs['int4'] / 1e6:.2f})"
            if best is not None and m == 1:
                line += f"  best {best} {runs[best]:.1f} (default {GEMV})"
            if m >= 64:
                old = triton_int4.DEQUANT_MIN_M
                for label, cut in (("gemm", 1 << 30), ("dequant+cuBLAS", 1)):
                    triton_int4.DEQUANT_MIN_M = cut
                    us = time_graph(lambda i: int4_matmul(x, *qs[i][:2], qs[i][2], GROUP), copies)
                    line += f"  {label} {us:8.1f}"
                triton_int4.DEQUANT_MIN_M = old
            print(line, flush=True)
        qs = dense = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
