"""The one-shot symmetric-memory all-reduce against NCCL's, on two GPUs (skipped with fewer).

Checks the sizes around the path's limit (above it NCCL takes over), a tensor that is a view at
an offset, a float32 tensor in a bf16 buffer (NCCL), and replay inside a CUDA graph, where the
inputs change between replays and the shared buffer is reused 8 times in one graph.
"""

from __future__ import annotations

import os

import pytest
import torch

from kernel_helpers import run_two_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")]


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from treadle.gpu_worker import distributed as par

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    par.init_parallel(rank, 2, dev, dtype=torch.bfloat16, custom_all_reduce=True)
    failures = []
    if par._SYMM_BUF is None:
        failures.append("symmetric-memory buffer not set up")
    limit = par.symm_max_bytes(2) // 2
    g = torch.Generator(device=dev).manual_seed(rank)
    for numel in (8, 4096, 128 * 4096, limit, limit + 8):
        x = torch.randn(numel, generator=g, device=dev).to(torch.bfloat16)
        ref = x.clone()
        dist.all_reduce(ref)
        if not torch.equal(par.all_reduce(x), ref):
            failures.append(f"numel {numel}: differs from NCCL")
    big = torch.randn(2, 4096, generator=g, device=dev).to(torch.bfloat16)
    ref = big[1].clone()
    dist.all_reduce(ref)
    if not torch.equal(par.all_reduce(big[1]), ref):
        failures.append("view at an offset: differs from NCCL")
    x32 = torch.randn(4096, generator=g, device=dev)
    ref = x32.clone()
    dist.all_reduce(ref)
    if not torch.allclose(par.all_reduce(x32), ref):
        failures.append("float32: differs from NCCL")

    static = torch.zeros(8, 4096, dtype=torch.bfloat16, device=dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(8):  # warm-up outside the graph, as graph capture wants
            par.all_reduce(static)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = static
        for _ in range(8):
            y = par.all_reduce(y)
    for trial in range(3):
        vals = torch.randn(8, 4096, generator=g, device=dev).to(torch.bfloat16)
        static.copy_(vals)
        graph.replay()
        ref = vals.clone()
        for _ in range(8):
            dist.all_reduce(ref)
        if not torch.equal(static, ref):
            failures.append(f"graph replay {trial}: differs from NCCL")
    torch.cuda.synchronize()
    if rank == 0:
        torch.save(failures, out)
    dist.destroy_process_group()


def test_one_shot_all_reduce_matches_nccl(tmp_path):
    assert run_two_ranks(_worker, tmp_path) == []
