"""The one-token Triton GEMV (``layers/triton_gemv.py``) against ``x @ W.T + b``.

On the CPU in Triton's interpreter (a child process, as in ``test_fused_ops.py``): odd sizes (K not
a multiple of the tile, N not a multiple of the rows a program), with and without a bias, and the
configs ``gemv_config`` picks. On CUDA the same in bfloat16, with programmatic dependent launch
where the GPU has it (the same bits as without), and inside a CUDA graph after a small kernel
that lets it start early, replayed with new inputs.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from kernel_helpers import interpret_script

# (N, K, BLOCK_N, BLOCK_K, bias)
SHAPES = [(37, 200, 16, 64, False), (64, 1024, 8, 128, True), (100, 1000, 32, 128, True), (5, 4096, 8, 512, False),
          (576, 576, None, None, True)]  # None: gemv_config's choice


def run_cases(device: str, dtype: torch.dtype, pdl: bool = False) -> list[str]:
    from treadle.gpu_worker.layers.triton_gemv import GemvConfig, gemv, gemv_config

    failures = []
    g = torch.Generator().manual_seed(0)
    for n, k, block_n, block_k, has_bias in SHAPES:
        cfg = gemv_config(n, k, pdl) if block_n is None else GemvConfig(block_n, block_k, 4, pdl)
        w = torch.randn(n, k, generator=g).to(device, dtype)
        b = torch.randn(n, generator=g).to(device, dtype) if has_bias else None
        for call in range(2):
            x = torch.randn(1, k, generator=g).to(device, dtype)
            want = x.float() @ w.float().T + (0 if b is None else b.float())
            got = gemv(x, w, cfg, b)
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            if got.shape != (1, n) or got.dtype != dtype or not torch.allclose(
                    got.float(), want, atol=tol * k ** 0.5, rtol=tol):
                failures.append(f"{n}x{k} {cfg} call {call}: max err {(got.float() - want).abs().max():.3g}")
    return failures


@pytest.fixture(scope="module")
def interpreted() -> list[str]:
    return interpret_script(__file__)


def test_interpreted_gemv_matches_matmul(interpreted):
    assert interpreted == []


def test_gemv_config_tiles_fit():
    from treadle.gpu_worker.layers.triton_gemv import gemv_config

    for n, k in [(4096, 4096), (28672, 4096), (4096, 14336), (1728, 576), (3, 5)]:
        cfg = gemv_config(n, k, False)
        assert cfg.block_k <= 1024 and cfg.block_k & (cfg.block_k - 1) == 0 and cfg.block_n >= 1


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_gemv_matches_matmul(dtype):
    from treadle.gpu_worker.layers.pdl import pdl_supported

    assert run_cases("cuda", dtype) == []
    if pdl_supported(torch.device("cuda")):
        assert run_cases("cuda", dtype, pdl=True) == []


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_replay_after_small_kernel():
    """A norm (which lets dependents start) then the GEMV of its output, captured and replayed:
    with PDL the GEMV must still read the norm's new output on every replay."""
    from treadle.gpu_worker.layers.pdl import pdl_supported
    from treadle.gpu_worker.layers.triton_gemv import gemv, gemv_config
    from treadle.gpu_worker.layers.triton_ops import rms_norm

    dev = torch.device("cuda")
    w = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16) / 64
    norm_w = torch.ones(4096, device=dev, dtype=torch.bfloat16)
    x = torch.zeros(1, 4096, device=dev, dtype=torch.bfloat16)
    results = {}
    for pdl in sorted({False, pdl_supported(dev)}):
        cfg = gemv_config(4096, 4096, pdl)
        gemv(rms_norm(x, norm_w, 1e-6), w, cfg)  # compile before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = gemv(rms_norm(x, norm_w, 1e-6), w, cfg)
        outs = []
        for seed in range(3):
            x.copy_(torch.randn(1, 4096, generator=torch.Generator().manual_seed(seed)).to(dev, torch.bfloat16))
            graph.replay()
            want = rms_norm(x, norm_w, 1e-6).float() @ w.float().T
            torch.testing.assert_close(y.float(), want, atol=5e-2, rtol=2e-2)
            outs.append(y.clone())
        results[pdl] = outs
    for a, b in zip(*results.values()):
        assert torch.equal(a, b)  # PDL changes when the kernel starts, never what it computes


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (set before triton loads)"
    print(json.dumps(run_cases("cpu", torch.float32)))
