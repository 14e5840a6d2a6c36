"""The fused all-reduce + residual + RMSNorm kernel (``layers/allreduce_norm.py``).

On the CPU it runs in Triton's interpreter (a child process, as in ``test_fused_ops.py``) as
rank 0 of 2 with the peer simulated: rank 1 has already pushed its partial rows into rank 0's
buffer and set its ready flags, so rank 0's program finds them, and the test checks what rank 0
computed and what it left for rank 1 (its rows in its region of rank 1's buffer, in the right
slot; its flags in rank 1's array; its call counts). Rows start at different call counts (one at
the wrap of the 16-bit count, one whose peer flag is already a call further), so both slots are used. The two-GPU test
runs the real thing through the model's norm against NCCL + the unfused norm, in and out of a
CUDA graph.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from kernel_helpers import interpret_script, run_two_ranks
from treadle.gpu_worker.layers.norm import RMSNorm

N, ROWS, MAX_ROWS = 64, 3, 8
SLOT = MAX_ROWS * N


def simulate_rank0() -> dict:
    from treadle.gpu_worker.layers.allreduce_norm import allreduce_rms_norm

    g = torch.Generator().manual_seed(0)
    x0, x1, res = (torch.randn(ROWS, N, generator=g) for _ in range(3))
    norm = RMSNorm(N, eps=1e-5)
    norm.weight.data = torch.rand(N, generator=g) + 0.5
    bufs = [torch.zeros(2 * 2 * SLOT), torch.zeros(2 * 2 * SLOT)]  # [slot, source rank, rows * N]
    region = lambda c, src, row: ((c % 2) * 2 + src) * SLOT + row * N  # noqa: E731
    flags = [torch.zeros(2 * MAX_ROWS, dtype=torch.int32), torch.zeros(2 * MAX_ROWS, dtype=torch.int32)]
    counters = torch.tensor([4, 0xFFFF, 0] + [0] * (MAX_ROWS - ROWS), dtype=torch.int32)
    for row in range(ROWS):  # rank 1 is one step ahead: its rows are stored and flagged
        c = (int(counters[row]) + 1) & 0xFFFF  # row 1 wraps to 0
        bufs[0][region(c, 1, row):][:N] = x1[row]
        flags[0][1 * MAX_ROWS + row] = (c + 1) & 0xFFFF if row == 2 else c  # row 2: rank 1 already a call further
    ptrs = lambda ts: torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64)  # noqa: E731
    out, res_out = allreduce_rms_norm(x0, res, norm.weight.data, norm.eps, ptrs(bufs), ptrs(flags), counters,
                                      SLOT, rank=0, world=2)
    ref_out, ref_res = norm.forward_torch(x0 + x1, res)
    own_rows_ok = all(torch.equal(bufs[1][region(int(counters[r]), 0, r):][:N], x0[r]) for r in range(ROWS))
    return {
        "out_err": (out - ref_out).abs().max().item(),
        "res_err": (res_out - ref_res).abs().max().item(),
        "counters": counters[:ROWS].tolist(),
        "flags_for_rank1": flags[1][:ROWS].tolist(),
        "own_rows_in_slot": own_rows_ok,
    }


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return interpret_script(__file__)


def test_interpreted_rank0_of_2(interpreted):
    assert interpreted["out_err"] < 1e-5 and interpreted["res_err"] < 1e-6
    assert interpreted["counters"] == [5, 0, 1]  # each row counted one call on, modulo 2**16
    assert interpreted["flags_for_rank1"] == [5, 0, 1]  # and told rank 1 so
    assert interpreted["own_rows_in_slot"]


# ---------------------------------------------------------------- two GPUs
def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from treadle.gpu_worker import distributed as par

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    par.init_parallel(rank, 2, dev, dtype=torch.bfloat16, custom_all_reduce=True, allreduce_fusion=True)
    failures = [] if par._FUSED is not None else ["fused state not set up"]
    norm = RMSNorm(4096, eps=1e-5).to(dev, torch.bfloat16)
    g = torch.Generator(device=dev).manual_seed(rank)
    norm.weight.data = (torch.rand(4096, generator=torch.Generator(device=dev).manual_seed(9), device=dev) + 0.5
                        ).to(torch.bfloat16)

    def reference(x: torch.Tensor, res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = x.clone()
        dist.all_reduce(y)
        return norm(y, res)

    # The last one falls back to all_reduce (in place) + norm: every call gets its own copies.
    for rows in (1, 7, 64, par.FUSED_MAX_ROWS, par.FUSED_MAX_ROWS + 1):
        for _ in range(3):  # the same rows again: both slots, counters moving on
            x = torch.randn(rows, 4096, generator=g, device=dev).to(torch.bfloat16)
            res = torch.randn(rows, 4096, generator=torch.Generator(device=dev).manual_seed(rows), device=dev
                              ).to(torch.bfloat16)
            got, want = norm(x.clone(), res.clone(), reduce=True), reference(x.clone(), res.clone())
            if not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])):
                failures.append(f"{rows} rows: differs from NCCL + norm")

    x_in = torch.zeros(8, 4096, dtype=torch.bfloat16, device=dev)
    r_in = torch.zeros(8, 4096, dtype=torch.bfloat16, device=dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        norm(x_in, r_in, reduce=True)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, r = x_in, r_in
        for _ in range(4):  # a chain, as the layers make one
            y, r = norm(y, r, reduce=True)
    for trial in range(3):
        x_in.copy_(torch.randn(8, 4096, generator=g, device=dev).to(torch.bfloat16))
        r_in.copy_(torch.randn(8, 4096, generator=torch.Generator(device=dev).manual_seed(trial), device=dev
                               ).to(torch.bfloat16))
        graph.replay()
        wy, wr = x_in, r_in
        for _ in range(4):
            wy, wr = reference(wy, wr)
        if not (torch.equal(y, wy) and torch.equal(r, wr)):
            failures.append(f"graph replay {trial}: differs from NCCL + norm")
    torch.cuda.synchronize()
    if rank == 0:
        torch.save(failures, out)
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_gpus_match_nccl_and_unfused_norm(tmp_path):
    assert run_two_ranks(_worker, tmp_path) == []


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (set before triton loads)"
    print(json.dumps(simulate_rank0()))
