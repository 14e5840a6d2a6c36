"""Decode attention alone at CI-workload batches: how fast each launch config reads the K/V.

    python bench/kernels/decode_attn_bench.py [--rows 150 --rows 256] [--kv-dtype fp8_e4m3] [--layout runs16]

At the SGLang CI workload's steady state (about 150-250 running rows, contexts of a few
thousand positions) decode attention is ~70% of a step (docs/perf.md), and the engine's kernel
reads K/V at ~2.7 TB/s on an H100 whose memory does 3.35. This times the kernel alone, one layer
of Llama-3.1-8B's shape (32 query heads, 8 KV heads, head dim 128), for rows whose lengths are
drawn as the workload makes them (input uniform in [1, 4096] plus a uniform share of an output
uniform in [1, 2048]), over a grid of stage-1 launch configs and split policies, and prints the
K/V bytes read per second. ``--layout``: where a row's positions live in the pool: ``contiguous``,
``runs16`` (runs of 16 locations in random order, the default) or ``shuffled`` (every position
anywhere), to see what the allocator's fragmentation costs. ``--head-major``: each layer's pool
stored ``[kv_heads, locations, head_dim]`` instead of ``[locations, kv_heads, head_dim]`` (the kernel
takes strides, so only the buffer changes), which makes a program's reads of one KV head contiguous
wherever a row's locations are. ``--configs engine`` times only the engine's launch config. Each row
count also prints the rate of one plain read of the same bytes (``torch.sum``), as the card's
attainable ceiling.
"""

from __future__ import annotations

import argparse
import itertools
import random

import torch

from treadle.gpu_worker.attention.triton_backend import TritonBackend
from treadle.gpu_worker.attention.triton_decode import decode_attention

H, HKV, D = 32, 8, 128


def workload_lengths(rows: int, seed: int) -> list[int]:
    rnd = random.Random(seed)
    return [rnd.randint(1, 4096) + rnd.randint(0, rnd.randint(1, 2048) - 1) + 1 for _ in range(rows)]


def locations(lengths: list[int], layout: str, seed: int) -> list[torch.Tensor]:
    """Each row's pool locations under ``layout``."""
    total = sum(lengths)
    if layout == "contiguous":
        pool = torch.arange(total)
    elif layout == "shuffled":
        pool = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    else:  # runs of 16
        runs = torch.arange(-(-total // 16) * 16).view(-1, 16)
        pool = runs[torch.randperm(runs.shape[0], generator=torch.Generator().manual_seed(seed))].flatten()
        pool = pool[pool < total]
    out, off = [], 0
    for n in lengths:
        out.append(pool[off:off + n])
        off += n
    return out


def time_ms(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, action="append")
    p.add_argument("--kv-dtype", default="bfloat16", choices=["bfloat16", "fp8_e4m3"])
    p.add_argument("--layout", default="runs16", choices=["contiguous", "runs16", "shuffled"])
    p.add_argument("--head-major", action="store_true")
    p.add_argument("--configs", default="grid", choices=["grid", "engine"])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    dev = torch.device("cuda")
    kv_dtype = torch.float8_e4m3fn if a.kv_dtype == "fp8_e4m3" else torch.bfloat16
    print(f"{torch.cuda.get_device_name(dev)}, K/V {a.kv_dtype}, layout {a.layout}; stage-1 configs: "
          "block_n / num_warps / num_stages; splits: (splits a KV head, fewest positions a split)")
    for rows in a.rows or [150]:
        lengths = workload_lengths(rows, a.seed)
        locs = locations(lengths, a.layout, a.seed)
        total = sum(lengths)
        if a.head_major:
            k_buf = torch.randn(HKV, total, D, device=dev).to(kv_dtype).transpose(0, 1)
            v_buf = torch.randn(HKV, total, D, device=dev).to(kv_dtype).transpose(0, 1)
        else:
            k_buf = torch.randn(total, HKV, D, device=dev).to(kv_dtype)
            v_buf = torch.randn(total, HKV, D, device=dev).to(kv_dtype)
        r2t = torch.zeros(rows, max(lengths), dtype=torch.int32, device=dev)
        for i, loc in enumerate(locs):
            r2t[i, :len(loc)] = loc.to(dev, torch.int32)
        q = torch.randn(rows, H, D, device=dev, dtype=torch.bfloat16)
        out = torch.empty_like(q)
        idx = torch.arange(rows, dtype=torch.int32, device=dev)
        seq_lens = torch.tensor(lengths, dtype=torch.int32, device=dev)
        gbytes = total * HKV * D * 2 * k_buf.element_size() / 1e9
        print(f"{rows} rows, {total:,} positions (longest {max(lengths):,}), {gbytes:.2f} GB of K/V a layer; "
              f"one plain read of as many bytes: {gbytes / time_ms(lambda: (k_buf.sum(), v_buf.sum())):.2f} TB/s")
        engine = TritonBackend(device=dev, dtype=torch.bfloat16)._num_splits(rows, HKV, max(lengths))
        policies = {"engine now": engine, "one split": (1, 64),
                    "8 x 256": (8, 256), "4 x 1024": (4, 1024)}
        grid = itertools.product(policies.items(), (32, 64, 128), (4, 8), (2, 3, 4))
        if a.configs == "engine":
            grid = [(("engine now", engine), None, 4, 3)]  # the engine's own block size
        ref = None
        for (name, (splits, chunk)), bn, warps, stages in grid:
            def call():
                decode_attention(q, k_buf, v_buf, out, r2t, idx, idx, seq_lens, D ** -0.5, splits, chunk,
                                 block_n=bn, num_warps=warps, num_stages=stages)
            try:
                ms = time_ms(call)
            except Exception as e:  # e.g. out of shared memory for the bigger tiles
                print(f"  {name:10s} {bn or '-':>3} / {warps} / {stages}: {type(e).__name__}")
                continue
            ref = out.clone() if ref is None else ref
            err = (out.float() - ref.float()).abs().max().item()
            print(f"  {name:10s} ({splits:2d} x {chunk:4d})  {bn or '-':>3} / {warps} / {stages}: {ms:7.3f} ms  "
                  f"{gbytes / ms:5.2f} TB/s  (max diff to the first config {err:.1e})", flush=True)


if __name__ == "__main__":
    main()
