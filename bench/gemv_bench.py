"""One-token GEMV on the GPU: cuBLAS (``F.linear``) against ``layers/triton_gemv.py``, per weight shape.

    python bench/gemv_bench.py [--quick]

Shapes: Llama-3.1-8B's projections at tp 1 and tp 2 (qkv, o, gate_up, down, lm_head). Each
candidate runs 50 times inside one CUDA graph (as in decode, no launch gaps), timed with CUDA
events; prints microseconds a call and the weight bandwidth, for cuBLAS, the heuristic config
(``gemv_config``) and the best of a small grid of configs. Kernel-level only: the model keeps
cuBLAS until this shows a shape where the GEMV wins (on an H200 it won none: see docs/perf.md).
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from treadle.gpu_worker.layers.triton_gemv import GemvWorkspace, gemv, gemv_config

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
    p.add_argument("--quick", action="store_true", help="only cuBLAS and the heuristic config")
    a = p.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    ws = GemvWorkspace(torch.device("cuda"))
    grid = list(itertools.product((8, 16, 32, 64), (256, 512), (1, 2, 4), (4, 8)))
    print(f"{torch.cuda.get_device_name()}: one-token GEMV, us a call (TB/s of weight read)")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x, w).float()
        tb = lambda us: n * k * 2 / us / 1e6  # noqa: E731
        cublas = time_graph(lambda _: F.linear(x, w))
        heur = gemv_config(n, k, sms)
        results = {}
        for cfg in [(*heur, 4)] + ([] if a.quick else grid):
            block_n, block_k, split, warps = cfg
            if split > 1 and k // split < block_k:
                continue
            out = gemv(x, w, ws, (block_n, block_k, split), warps)
            if not torch.allclose(out.float(), ref, atol=0.5, rtol=2e-2):
                print(f"  {name} {cfg}: WRONG RESULT")
                continue
            results[cfg] = time_graph(lambda _: gemv(x, w, ws, (block_n, block_k, split), warps))
        best = min(results, key=results.get)
        h = results[(*heur, 4)]
        print(f"{name:12s} {n}x{k}: cuBLAS {cublas:7.1f} ({tb(cublas):.2f})  heuristic {heur} {h:7.1f} ({tb(h):.2f})  "
              f"best {best} {results[best]:7.1f} ({tb(results[best]):.2f})", flush=True)


if __name__ == "__main__":
    main()
