"""The fused MoE (``layers/triton_moe.py``) on the GPU at one Qwen3-30B-A3B layer's shape (128
experts, top-8, hidden 2048, expert width 768 / tp), per token count: routing plus experts, in a
CUDA graph, timed with CUDA events (``gemv_bench.time_graph``), each call on its own copy of the
experts so that decode sizes are not served from L2.

    python bench/kernels/moe_bench.py [--tp 1] [--grid] [--tokens 1,8,64]

Prints microseconds a call and the read rate over the experts the routing touched (TB/s: the
bandwidth figure that matters at decode sizes) for what the engine runs (``engine``: the per-pair
GEMVs up to ``GEMV_MAX_PAIRS`` pairs, else the tiled GEMMs with the default config), the tiled
GEMMs with the default config, and with ``--grid`` the best tiled config of a grid, as a
``CONFIGS`` entry to paste into ``triton_moe.py``.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from gemv_bench import time_graph
from treadle.gpu_worker.layers.moe import moe_torch
from treadle.gpu_worker.layers.triton_moe import MoeConfig, fused_moe, moe_config
from treadle.gpu_worker.layers.triton_moe_route import fused_route

EXPERTS, TOP_K, HIDDEN, WIDTH = 128, 8, 2048, 768
GRID = [MoeConfig(bm, bn, bk, gm, w, s) for bm, bn, bk, gm, w, s in itertools.product(
    (16, 32, 64, 128), (32, 64, 128), (64, 128), (1, 8), (4, 8), (3, 4))]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--grid", action="store_true", help="also time a grid of block configs")
    p.add_argument("--tokens", default="1,2,4,8,16,32,64,128,256,1024,4096")
    a = p.parse_args()
    inter = WIDTH // a.tp
    dev, dt = "cuda", torch.bfloat16
    copies = 3  # the experts one call touches at batch 1 (38 MB at tp 1) times three: past H100's 50 MB of L2
    w13 = [torch.randn(EXPERTS, 2 * inter, HIDDEN, device=dev, dtype=dt) / HIDDEN ** 0.5 for _ in range(copies)]
    w2 = [torch.randn(EXPERTS, HIDDEN, inter, device=dev, dtype=dt) / inter ** 0.5 for _ in range(copies)]
    gate = torch.randn(EXPERTS, HIDDEN, device=dev, dtype=dt) / HIDDEN ** 0.5
    per_expert = 3 * inter * HIDDEN * 2
    print(f"{torch.cuda.get_device_name()}: fused MoE, E={EXPERTS} top-{TOP_K} H={HIDDEN} I={inter} (tp {a.tp}); "
          "us a call (TB/s over the experts touched)")
    table = []
    for t in (int(x) for x in a.tokens.split(",")):
        x = torch.randn(t, HIDDEN, device=dev, dtype=dt)
        weights, ids = fused_route(x @ gate.T, TOP_K, True)
        touched = ids.unique().numel() * per_expert
        want = moe_torch(x.float(), w13[0].float(), w2[0].float(), weights, ids)
        chosen = moe_config(t, EXPERTS, inter, HIDDEN, TOP_K)
        results: dict = {}
        for cfg in ["engine", chosen] + (GRID if a.grid else []):
            conf = None if cfg == "engine" else cfg
            try:
                got = fused_moe(x, w13[0], w2[0], weights, ids, conf)
            except Exception as e:  # a config past the card's shared memory
                print(f"  T={t} {cfg}: {type(e).__name__}")
                continue
            if not torch.allclose(got.float(), want, atol=5e-2, rtol=5e-2):
                print(f"  T={t} {cfg}: WRONG RESULT")
                continue

            def call(i: int, conf=conf) -> None:
                w, ids_ = fused_route(x @ gate.T, TOP_K, True)
                fused_moe(x, w13[i % copies], w2[i % copies], w, ids_, conf)
            results[cfg] = time_graph(call, 20)
        tiled = {c: us for c, us in results.items() if c != "engine"}
        if "engine" not in results or not tiled:
            continue
        best = min(tiled, key=tiled.get)
        rate = lambda us: touched / us / 1e6  # noqa: E731
        print(f"T={t:5d}: engine {results['engine']:8.1f} ({rate(results['engine']):.2f})  "
              f"tiled {tuple(chosen)} {tiled.get(chosen, float('nan')):8.1f}  "
              f"best tiled {tuple(best)} {tiled[best]:8.1f} ({rate(tiled[best]):.2f})", flush=True)
        table.append((t, best))
    if a.grid:
        rows = ", ".join(f"({t}, MoeConfig{tuple(c)})" for t, c in table)
        print(f"CONFIGS[({EXPERTS}, {inter}, {HIDDEN})] = [{rows}]")


if __name__ == "__main__":
    main()
