"""The one-token Triton GEMV (``layers/triton_gemv.py``) against ``x @ W.T``.

On the CPU in Triton's interpreter (a child process, as in ``test_fused_ops.py``): odd sizes,
every split count (the last-ticket reduction and the ticket reset), and two calls in a row. On
CUDA the same in bfloat16, and a CUDA-graph replay of the split-K path.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from kernel_helpers import interpret_script

# (N, K, (BLOCK_N, BLOCK_K, SPLIT_K))
SHAPES = [(37, 200, (16, 64, 1)), (64, 1024, (16, 128, 4)), (100, 1000, (32, 128, 2)), (5, 4096, (16, 512, 8))]


def run_cases(device: str, dtype: torch.dtype) -> list[str]:
    from treadle.gpu_worker.layers.triton_gemv import GemvWorkspace, gemv

    ws, failures = GemvWorkspace(torch.device(device)), []
    g = torch.Generator().manual_seed(0)
    for n, k, cfg in SHAPES:
        w = torch.randn(n, k, generator=g).to(device, dtype)
        for call, acc_2d in ((0, False), (1, False), (2, True)):
            x = torch.randn(1, k, generator=g).to(device, dtype)
            want = (x.float() @ w.float().T).to(dtype)
            got = gemv(x, w, ws, cfg, acc_2d=acc_2d)
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            if got.shape != (1, n) or not torch.allclose(got.float(), want.float(), atol=tol * k ** 0.5, rtol=tol):
                failures.append(f"{n}x{k} {cfg} call {call}: max err {(got.float() - want.float()).abs().max():.3g}")
        if cfg[2] > 1 and int(ws.tickets.abs().sum()) != 0:
            failures.append(f"{n}x{k} {cfg}: tickets not reset")
    return failures


@pytest.fixture(scope="module")
def interpreted() -> list[str]:
    return interpret_script(__file__)


def test_interpreted_gemv_matches_matmul(interpreted):
    assert interpreted == []


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_gemv_matches_matmul(dtype):
    assert run_cases("cuda", dtype) == []


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_replay_split_k():
    from treadle.gpu_worker.layers.triton_gemv import GemvWorkspace, gemv

    ws, dev = GemvWorkspace(torch.device("cuda")), "cuda"
    w = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    x = torch.zeros(1, 4096, device=dev, dtype=torch.bfloat16)
    cfg = (16, 512, 4)
    gemv(x, w, ws, cfg)  # warm-up: compiles and reserves the workspace before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gemv(x, w, ws, cfg)
    for _ in range(3):
        x.copy_(torch.randn(1, 4096, device=dev, dtype=torch.bfloat16))
        graph.replay()
        torch.testing.assert_close(y.float(), (x.float() @ w.float().T), atol=0.5, rtol=2e-2)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (set before triton loads)"
    print(json.dumps(run_cases("cpu", torch.float32)))
