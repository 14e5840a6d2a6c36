"""Sweep the 4-bit products' tiles on a GPU and print the table ``layers/int4_tiles.py`` reads.

    PYTHONPATH=$PWD python bench/kernels/int4_sweep.py [--out int4_table.py] [--ms 1,2,...] [--shapes qkv,o]
    PYTHONPATH=$PWD python bench/kernels/int4_sweep.py --fp8 [--out fp8_table.py]

For each Llama-3.1-8B projection (group 128 with zero points, as AWQ) and M in ``MS``: bf16
``torch.matmul`` on a dense weight, then every candidate tile of ``candidates(M)`` through
``int4_matmul(..., tile=...)``: the CUDA-core GEMV (``fma``) for a few rows, tensor-core tiles
(``dot``, and ``dot_wx`` with the weight as the left operand, up to 128 rows) with split-K for
small and mid M, dequantize + cuBLAS (``deq``) for large M. A candidate
is checked once against dequantize-then-matmul (wrong ones are reported and dropped), then
timed in one CUDA graph over weight copies that together exceed L2 (``gemv_bench.time_graph``).
Prints, per shape and M: bf16 us, ``int4_tiles.choose``'s tile (the table in force) and the best
one, in us and TB/s of the weight bytes the format reads, and the best one's speed-up over bf16;
then the ``TABLE`` dict to paste into ``int4_tiles.py`` (also written to ``--out``).

``--fp8``: the FP8 one-token GEMV (``triton_fp8.gemv``, per-row scales) over its tile grid per
shape, and the ``GEMV_TILES`` dict for ``triton_fp8.py``.

Budget: the grid is pruned to about 50 kernels to compile (compiling, not timing, is what costs;
the first shape compiles them and the others reuse them); past ``--budget`` seconds (default
200) only tiles already compiled are tried (the table's choice is always timed first).
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Optional

import torch

from gemv_bench import time_graph
from treadle.gpu_worker.layers.int4_tiles import M_BUCKETS, Tile, choose
from treadle.gpu_worker.layers.triton_int4 import int4_matmul
from treadle.gpu_worker.quant.int4_format import unpack_kmajor

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}  # (N, K)
GROUP = 128
DEVICE = "cuda"
COPY_BYTES = 256 << 20  # weight copies a graph cycles through: 5x the H100's L2
FMA = {  # the GEMV's rows (M rounded up to a power of two) -> (block_n, block_k, warps). A row's
    # step is spread over block_k / 32 threads (16 bytes each), so block_n * block_k / (1024 * warps)
    # rows fall on each thread: with 2 the activations' loads and conversions serve both (4 made
    # Triton reload them, on sm_90 TTGIR compiled on a CPU); rows * block_k / 8 < 32 * warps keeps
    # those loads in the weights' layout (larger ones convert through shared memory every step)
    1: [(16, 512, 4), (32, 256, 4), (64, 128, 4), (16, 256, 4), (8, 512, 4), (16, 1024, 8), (32, 512, 8),
        (64, 256, 8), (8, 1024, 8)],
    2: [(16, 256, 4), (64, 128, 4), (32, 256, 4), (16, 512, 8), (64, 256, 8)],
    4: [(32, 128, 4), (64, 128, 4), (32, 256, 8), (64, 256, 8)],
    8: [(32, 64, 4), (64, 64, 4), (64, 128, 8)],
}
DOT = {  # block_m -> (block_n, block_k, warps, stages) (none that spill registers on sm_90)
    16: [(32, 128, 4, 4), (64, 128, 4, 4), (128, 128, 4, 3), (64, 64, 4, 4)],
    32: [(64, 128, 4, 4), (64, 64, 4, 4), (128, 64, 4, 4), (128, 64, 8, 3)],
    64: [(64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (256, 64, 8, 3)],
    128: [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3)],
}
DOT_WX = {  # block_m -> (block_n, block_k, warps, stages): W x^T, the weight the left operand (a warpgroup's 64 rows)
    16: [(64, 128, 4, 4), (128, 128, 4, 3), (64, 64, 4, 4), (128, 128, 8, 3)],
    32: [(64, 128, 4, 4), (128, 128, 4, 3), (128, 64, 4, 4)],
    64: [(64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3)],
}


def candidates(m: int) -> list[Tile]:
    """The tiles tried at ``m`` rows (split 0: ``split_k``'s choice)."""
    tiles = []
    rows = 1 << (m - 1).bit_length()
    for (bn, bk, warps), split in itertools.product(FMA.get(rows, []), (0, 1, 2, 4, 8)):
        tiles.append(Tile("fma", rows, bn, bk, warps, 1, split))
    bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 128 else 128
    splits = (0, 1, 2, 4, 8, 16) if m <= 16 else (0, 1, 2, 4) if m <= 128 else (1, 2) if m <= 256 else (1,)
    for kind, grid in (("dot", DOT), ("dot_wx", DOT_WX)):
        for (bn, bk, warps, stages), split in itertools.product(grid.get(bm, []), splits):
            tiles.append(Tile(kind, bm, bn, bk, warps, stages, split))
    if m >= 256:
        tiles.append(Tile("deq"))
    return tiles


def binary(tile: Tile, m: int) -> tuple:
    """What makes Triton compile a tile anew (shapes and split are runtime arguments; the 8B
    shapes share their specializations): the kind, blocks, warps and stages, the GEMV's rows
    (a power of two) and whether the tensor-core kernel waits with PDL (up to 16 rows)."""
    rows = 1 << (m - 1).bit_length() if tile.kind == "fma" else tile.block_m
    return (tile.kind, rows, tile.block_n, tile.block_k, tile.warps, tile.stages, tile.kind != "fma" and m <= 16)


def packed(n: int, k: int, copies: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Random packed weights in the kernels' layout (``w [N, K/8]``, scales and zeros ``[N, K/G]``)."""
    return [(torch.randint(-2 ** 31, 2 ** 31 - 1, (n, k // 8), dtype=torch.int32, device=DEVICE),
             torch.rand(n, k // GROUP, device=DEVICE).mul_(0.004).add_(0.001).half(),
             torch.randint(7, 10, (n, k // GROUP), dtype=torch.uint8, device=DEVICE)) for _ in range(copies)]


def dequantized(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The float32 ``[N, K]`` weight (the reference)."""
    q = unpack_kmajor(w).t().float()
    return (q - z.float().repeat_interleave(GROUP, 1)) * s.float().repeat_interleave(GROUP, 1)


def row(tile: Tile) -> tuple:
    return (tile.kind, tile.block_m, tile.block_n, tile.block_k, tile.warps, tile.stages, tile.split)


def sweep_int4(a: argparse.Namespace) -> None:
    ms = [int(m) for m in a.ms.split(",")]
    names = [s for s in a.shapes.split(",") if s] or list(SHAPES)
    start, best_rows, cut, compiled = time.time(), {}, [], set()
    deadline = start + a.budget
    print(f"{torch.cuda.get_device_name()}: int4 group {GROUP} with zero points; us a call (TB/s of weight bytes)")
    print(f"{'shape':8} {'M':>5} {'bf16':>8} {'table':>15} {'best':>15} {'x bf16':>7}  best tile")
    for name in names:
        n, k = SHAPES[name]
        q_bytes = n * k // 2 + n * (k // GROUP) * 3
        copies = max(2, -(-COPY_BYTES // q_bytes))
        qs = packed(n, k, copies)
        dense = [torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16)
                 for _ in range(max(2, -(-COPY_BYTES // (n * k * 2))))]
        ref_w = dequantized(*qs[0])
        for m in ms:
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
            want = x.float() @ ref_w.T
            bf16 = time_graph(lambda i: torch.matmul(x, dense[i % len(dense)].t()), len(dense) * 4)
            chosen = choose(m, n, k)
            times: dict[Tile, float] = {}
            tried = [chosen] + [t for t in candidates(m) if t != chosen]
            skipped = 0
            for tile in tried:
                if times and time.time() > deadline and binary(tile, m) not in compiled:
                    skipped += 1  # past the budget only tiles already compiled (later shapes reuse them)
                    continue
                compiled.add(binary(tile, m))
                try:
                    got = int4_matmul(x, *qs[0][:2], qs[0][2], GROUP, tile=tile).float()
                    err = float((got - want).norm() / want.norm())
                    if not err < 1e-2:
                        print(f"  {name} M={m} {tile}: WRONG (rel err {err:.3g})", flush=True)
                        continue
                    times[tile] = time_graph(lambda i: int4_matmul(x, *qs[i][:2], qs[i][2], GROUP, tile=tile), copies)
                except Exception as e:  # a tile this GPU cannot run (shared memory, registers): skip it
                    print(f"  {name} M={m} {tile}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
            if skipped:
                cut.append(f"{name} M={m}: {skipped} of {len(tried)}")
            if not times:
                continue
            best = min(times, key=times.get)
            tb = lambda us: q_bytes / us / 1e6  # noqa: E731
            ct = times.get(chosen, float("nan"))
            print(f"{name:8} {m:>5} {bf16:8.1f} {ct:8.1f} ({tb(ct):4.2f}) {times[best]:8.1f} ({tb(times[best]):4.2f}) "
                  f"{bf16 / times[best]:7.2f}  {row(best)} of {len(times)}", flush=True)
            best_rows[(n, k, m)] = row(best)
        qs = dense = ref_w = None
        torch.cuda.empty_cache()
    write_table("TABLE: dict[tuple[int, int, int], tuple]", "", best_rows, "gpu_worker/layers/int4_tiles.py",
                start, a.out)
    if cut:
        print(f"over --budget {a.budget:.0f} s, tiles not compiled and so skipped: {'; '.join(cut)} "
              "(rerun those with --shapes/--ms)")
    missing = [mm for mm in ms if mm not in M_BUCKETS]
    if missing:
        print(f"(M {missing} are not buckets of int4_tiles.M_BUCKETS: their rows only inform)")


def write_table(decl: str, flags: str, rows: dict, target: str, start: float, out: Optional[str]) -> None:
    """Print the best tiles as the Python dict ``decl`` to paste into ``target`` (and write it to ``out``)."""
    table = f"{decl} = {{  # {torch.cuda.get_device_name()}, bench/kernels/int4_sweep.py{flags}\n" + \
        "".join(f"    {key}: {val},\n" for key, val in sorted(rows.items())) + "}\n"
    print(f"\n# {time.time() - start:.0f} s; paste into {target}:\n{table}")
    if out:
        with open(out, "w") as f:
            f.write(table)


def sweep_fp8(a: argparse.Namespace) -> None:
    from treadle.gpu_worker.layers import triton_fp8
    from treadle.gpu_worker.layers.fp8_linear import quantize_rows
    from treadle.gpu_worker.layers.pdl import pdl_supported

    start, best_rows = time.time(), {}
    names = [s for s in a.shapes.split(",") if s] or list(SHAPES)
    print(f"{torch.cuda.get_device_name()}: FP8 one-token GEMV (per-row scales), us a call (TB/s of weight bytes)")
    for name in names:
        n, k = SHAPES[name]
        copies = max(2, -(-COPY_BYTES // (n * k)))
        w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * 0.02
        q, s = quantize_rows(w)
        qs = [(q.clone(), s.reshape(n, 1).clone()) for _ in range(copies)]
        dense = [torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) for _ in range(max(2, copies // 2))]
        x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
        pdl = pdl_supported(x.device)
        want = x.float() @ (q.float() * s.reshape(n, 1)).T
        bf16 = time_graph(lambda i: torch.matmul(x, dense[i % len(dense)].t()), len(dense) * 4)
        times = {}
        for tile in itertools.product((2, 4, 8, 16, 32), (256, 512, 1024, 2048), (4, 8)):
            try:
                got = triton_fp8.gemv(x, *qs[0], k, None, pdl, tile).float()
                if not float((got - want).norm() / want.norm()) < 1e-2:
                    print(f"  {name} {tile}: WRONG")
                    continue
                times[tile] = time_graph(lambda i: triton_fp8.gemv(x, *qs[i], k, None, pdl, tile), copies)
            except Exception as e:
                print(f"  {name} {tile}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
        best = min(times, key=times.get)
        dflt = triton_fp8.gemv_tile(n, k)
        print(f"{name:8} {n}x{k}: bf16 {bf16:7.1f}  default {dflt} {times.get(dflt, float('nan')):7.1f}  best {best} "
              f"{times[best]:7.1f} ({n * k / times[best] / 1e6:.2f} TB/s)", flush=True)
        best_rows[(n, k)] = best
        qs = dense = None
        torch.cuda.empty_cache()
    write_table("GEMV_TILES: dict[tuple[int, int], tuple[int, int, int]]", " --fp8", best_rows,
                "gpu_worker/layers/triton_fp8.py", start, a.out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ms", default=",".join(map(str, M_BUCKETS)))
    p.add_argument("--shapes", default="", help=f"comma-separated names of {list(SHAPES)} (default: all)")
    p.add_argument("--budget", type=float, default=200.0, help="seconds after which only compiled tiles are tried")
    p.add_argument("--out", default="", help="also write the table to this file")
    p.add_argument("--fp8", action="store_true", help="sweep the FP8 GEMV instead")
    a = p.parse_args()
    (sweep_fp8 if a.fp8 else sweep_int4)(a)


if __name__ == "__main__":
    main()
