"""One-token GEMV on the GPU: cuBLAS (``F.linear``) against ``layers/triton_gemv.py``, per weight shape.

    python bench/kernels/gemv_bench.py [--quick]

Shapes: Llama-3.1-8B's projections at tp 1 and tp 2 (qkv, o, gate_up, down, lm_head). Each
candidate runs inside one CUDA graph (as in decode, no launch gaps), each call on its own copy of
the weight (so no call is served from L2), timed with CUDA events; prints microseconds a call and
the weight bandwidth, for cuBLAS, ``gemv_config``'s choice and the best of a grid (each kernel
alone, no PDL: ``pdl_bench.py`` times them in a chain).
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from treadle.gpu_worker.layers.triton_gemv import GemvConfig, gemv, gemv_config

SHAPES = {  # name: (N, K)
    "tp1 qkv": (6144, 4096), "tp1 o": (4096, 4096), "tp1 gate_up": (28672, 4096), "tp1 down": (4096, 14336),
    "tp1 lm_head": (128256, 4096),
    "tp2 qkv": (3072, 4096), "tp2 o": (4096, 2048), "tp2 gate_up": (14336, 4096), "tp2 down": (4096, 7168),
    "tp2 lm_head": (64128, 4096),
}
CALLS = 50


def time_graph(fn, calls: int = CALLS) -> float:
    """Microseconds a call: ``fn(i)`` for i in range(calls) captured in one CUDA graph, best of 5
    replays (``i`` lets a caller read a different weight copy each call, out of L2's reach)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(calls):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / calls)
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="only cuBLAS and gemv_config's choice")
    p.add_argument("--shapes", default="", help="comma-separated names from SHAPES (default: all)")
    a = p.parse_args()
    grid = [GemvConfig(bn, bk, wp, False) for bn, bk, wp in itertools.product((4, 8, 16, 32), (256, 512, 1024), (4, 8))]
    names = [n for n in a.shapes.split(",") if n] or list(SHAPES)
    print(f"{torch.cuda.get_device_name()}: one-token GEMV, us a call (TB/s of weight read); "
          f"each call reads its own weight copy (>= 1 GiB of copies), as in the model")
    for name in names:
        n, k = SHAPES[name]
        copies = max(2, -(-(1 << 30) // (n * k * 2)))
        w = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x, w[0]).float()
        tb = lambda us: n * k * 2 / us / 1e6  # noqa: E731
        cublas = time_graph(lambda i: F.linear(x, w[i]), copies)
        chosen = gemv_config(n, k, False)
        results = {}
        for cfg in [chosen] + ([] if a.quick else grid):
            if not torch.allclose(gemv(x, w[0], cfg).float(), ref, atol=0.5, rtol=2e-2):
                print(f"  {name} {cfg}: WRONG RESULT")
                continue
            results[cfg] = time_graph(lambda i: gemv(x, w[i], cfg), copies)
        best = min(results, key=results.get)
        cfg_str = lambda c: f"({c.block_n}, {c.block_k}, {c.num_warps})"  # noqa: E731
        print(f"{name:12s} {n}x{k}: cuBLAS {cublas:7.1f} ({tb(cublas):.2f})  gemv_config {cfg_str(chosen)} "
              f"{results[chosen]:7.1f} ({tb(results[chosen]):.2f})  best {cfg_str(best)} {results[best]:7.1f} "
              f"({tb(results[best]):.2f})", flush=True)
        w = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
