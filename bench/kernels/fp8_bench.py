"""FP8 linear products on the GPU against bf16 ``F.linear``, per Llama-3.1-8B projection and batch size.

    python bench/kernels/fp8_bench.py [--ms 1,4,16,64,256,1024,4096] [--shapes "tp1 o,tp1 down"] [--grid]

For each shape and M: bf16 cuBLAS, FP8 with per-row scales (``Fp8Linear``: the Triton GEMV at M=1,
the W8A16 Triton GEMM up to ``SKINNY_MAX``, per-token quantization + ``torch._scaled_mm`` above)
and FP8 with 128x128 block scales (GEMV, then the Triton GEMM). Each runs inside one CUDA graph
(``gemv_bench.time_graph``), rotating over weight copies that together exceed L2. Prints
microseconds a call, the weight read rate at M=1 (the memory roofline of a decode step) and the
max error of each FP8 product against dequantize-then-matmul. ``--grid``: also the one-token GEMV
(per-row scales) over a grid of (rows a program, K tile, warps), best first, to tune
``triton_fp8.GEMV_TILE``.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from gemv_bench import SHAPES, time_graph
from treadle.gpu_worker.layers import triton_fp8
from treadle.gpu_worker.layers.fp8_linear import Fp8Linear, dequantize, quantize_rows

COPIES = 4  # x the smallest weight (16 MB in FP8) > the H100's 50 MB L2


def fp8_layers(w: torch.Tensor, block: bool) -> list[Fp8Linear]:
    n, k = w.shape
    q, s = quantize_rows(w)
    if not block:
        return [Fp8Linear(q.clone(), s.clone(), k) for _ in range(COPIES)]
    kb = (k + 127) // 128
    sb = s[:, None].expand(n, kb).contiguous()  # block scales, kept per row (the same value here)
    return [Fp8Linear(q.clone(), sb.clone(), 128) for _ in range(COPIES)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ms", default="1,2,4,8,16,32,64,256,1024,4096")
    p.add_argument("--shapes", default="tp1 qkv,tp1 o,tp1 gate_up,tp1 down")
    p.add_argument("--grid", action="store_true", help="tune the one-token GEMV's tile")
    a = p.parse_args()
    ms = [int(m) for m in a.ms.split(",")]
    print(f"{'shape':<12} {'M':>5} {'bf16 us':>9} {'fp8 row us':>10} {'fp8 blk us':>10} {'fp8 GB/s':>9} {'err':>8}")
    for name in a.shapes.split(","):
        n, k = SHAPES[name]
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        dense = [w.clone() for _ in range(COPIES)]
        rows, blocks = fp8_layers(w, False), fp8_layers(w, True)
        deq = dequantize(rows[0].weight, rows[0].scale, k).to(torch.bfloat16)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_bf16 = time_graph(lambda i: F.linear(x, dense[i % COPIES]))
            t_row = time_graph(lambda i: rows[i % COPIES].product(x, None))
            t_blk = time_graph(lambda i: blocks[i % COPIES].product(x, None))
            want = F.linear(x.float(), deq.float())
            err = max((rows[0].product(x, None).float() - want).abs().max().item(),
                      (blocks[0].product(x, None).float() - want).abs().max().item()) / want.abs().max().item()
            print(f"{name:<12} {m:>5} {t_bf16:>9.1f} {t_row:>10.1f} {t_blk:>10.1f} {n * k / t_row / 1e3:>9.0f} {err:>8.1e}",
                  flush=True)
        if a.grid:
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            times = []
            for tile in itertools.product((2, 4, 8, 16), (256, 512, 1024, 2048), (4, 8)):
                t = time_graph(lambda i: triton_fp8.gemv(x, rows[i % COPIES].weight, rows[i % COPIES].scales_2d, k,
                                                         None, False, tile))
                times.append((t, tile))
            for t, tile in sorted(times)[:5]:
                print(f"{name:<12} GEMV tile {tile} (default {triton_fp8.GEMV_TILE}): {t:.1f} us, "
                      f"{n * k / t / 1e3:.0f} GB/s", flush=True)
        del dense, rows, blocks
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
