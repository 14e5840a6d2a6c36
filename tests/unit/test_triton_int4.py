"""The 4-bit Triton products (``layers/triton_int4.py``) against dequantize-then-matmul.

On the CPU in Triton's interpreter (a child process, see ``kernel_helpers.interpret_script``):
tiny shapes through the CUDA-core GEMV (up to 8 rows) and the tensor-core GEMM (from 1 row),
with and without zero points, groups that span a step, groups smaller than one and groups that
are not a power of two, split-K forced on and off, in float32 and float16 (the interpreter's
``tl.dot`` mishandles bfloat16, so bfloat16 runs on CUDA only), and the dequantize + matmul
path. On CUDA (``pytest -m gpu``): M from 1 to 4,096 at Llama shapes through the table's choice
and through each path, groups 32/64/128 and per-channel, with and without zeros, GPTQ act order
through a whole layer, and a CUDA graph replay.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from kernel_helpers import interpret_script, interpreter_runs_loops
from treadle.gpu_worker.layers.int4_tiles import Tile

# (M, K, N, group, zeros, sms, tile): sms 1 never splits K; 132 splits where the grid is small;
# tile None: ``int4_tiles.choose``'s (the heuristic's, for these shapes)
FMA, DOT, WX = Tile("fma", 1, 16, 256, 4), Tile("dot", 16, 32, 64, 4, 2), Tile("dot_wx", 16, 64, 64, 4, 2)
CPU_CASES = [(1, 1024, 96, 128, True, 132, None), (1, 256, 64, 32, False, 1, None), (3, 512, 80, 64, True, 132, None),
             (4, 384, 40, 48, True, 132, None), (2, 512, 64, 512, False, 132, None),
             (5, 1024, 64, 128, True, 132, None), (16, 256, 64, 32, False, 1, None), (20, 1024, 72, 64, True, 132, None),
             (40, 384, 64, 384, False, 132, None),
             (70, 256, 64, 128, True, 1, None), (1, 768, 48, 128, True, 132, Tile("fma", 1, 16, 512, 4, 1, 2)),
             (8, 512, 32, 128, True, 132, Tile("fma", 8, 8, 128, 4)), (3, 384, 24, 384, False, 1, FMA),
             (1, 1024, 64, 128, True, 132, DOT), (12, 640, 40, 32, True, 132, DOT), (2, 384, 48, 48, False, 132, FMA),
             (2, 256, 32, 16, True, 132, FMA), (5, 256, 32, 16, False, 1, DOT), (3, 512, 64, 128, True, 132, WX),
             (16, 256, 32, 16, False, 132, WX), (24, 384, 64, 384, True, 1, Tile("dot_wx", 32, 64, 128, 4, 3))]


def _weights(k: int, n: int, group: int, zeros: bool, device: str, g: torch.Generator):
    """Random packed weights in the kernels' K-major layout: ``w [N, K/8]``, ``s`` and ``z [N, K/G]``."""
    w = torch.randint(-2 ** 31, 2 ** 31 - 1, (n, k // 8), dtype=torch.int32, generator=g).to(device)
    s = (torch.rand(n, k // group, generator=g) * 0.01 + 0.001).half().to(device)
    z = torch.randint(0, 17, (n, k // group), dtype=torch.uint8, generator=g).to(device) if zeros else None
    return w, s, z


def reference(w: torch.Tensor, s: torch.Tensor, z) -> torch.Tensor:
    """The ``[N, K]`` float32 weight of the K-major parts."""
    from treadle.gpu_worker.quant.int4_format import dequantize, unpack_kmajor

    return dequantize(unpack_kmajor(w), None if z is None else z.t(), s.t())


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


def run_cases(device: str, dtype: torch.dtype, cases, tile=None) -> list[str]:
    """``tile``: one tile for every case (else each case's own)."""
    from treadle.gpu_worker.layers.triton_int4 import int4_matmul

    failures = []
    g = torch.Generator().manual_seed(0)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for m, k, n, group, zeros, sms, case_tile in cases:
        w, s, z = _weights(k, n, group, zeros, device, g)
        x = torch.randn(m, k, generator=g).to(device, dtype)
        want = x.float() @ reference(w, s, z).to(device).T
        got = int4_matmul(x, w, s, z, group, sms=sms, tile=tile or case_tile)
        if got.shape != (m, n) or got.dtype != dtype or _rel_err(got, want) > tol:
            failures.append(f"M={m} K={k} N={n} group={group} zeros={zeros} sms={sms} tile={tile or case_tile}: "
                            f"rel err {_rel_err(got, want):.3g}")
    return failures


@pytest.mark.skipif(not interpreter_runs_loops(), reason="this Triton's interpreter cannot run loops")
def test_interpreted_kernels_match_dequantize_then_matmul():
    assert interpret_script(__file__) == {"float32": [], "float16": [], "dequantized": []}


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
MS = [1, 2, 3, 4, 5, 8, 16, 17, 32, 64, 100, 256, 512, 1024, 4096]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("zeros", [True, False])
def test_cuda_kernels_match_dequantize_then_matmul(group, zeros):
    shapes = [(4096, 6144), (14336, 4096)]  # (K, N): 8B's qkv and down projections
    cases = [(m, k, n, k if group == -1 else group, zeros, None, None) for m in MS for k, n in shapes]
    assert run_cases("cuda", torch.bfloat16, cases) == []
    for tile in (FMA, Tile("dot", 16, 64, 128, 4, 4), Tile("dot_wx", 16, 64, 128, 4, 4), Tile("deq")):  # each path
        few = [c for c in cases[::3] if tile.kind != "fma" or c[0] <= 16]
        assert run_cases("cuda", torch.bfloat16, few, tile) == [], tile
    assert run_cases("cuda", torch.float16, cases[::5]) == []


@pytest.mark.gpu
@needs_cuda
def test_cuda_gptq_act_order_layer_and_graph_replay():
    """A GPTQ desc_act layer (inputs sorted by group at load, activations gathered to match) on
    CUDA against the dense layer of the dequantized weight, eagerly and replayed in a CUDA graph."""
    from int4_pack import gptq_quantize
    from treadle.gpu_worker.layers.linear import MergedColumnParallelLinear, quantized_layers
    from treadle.gpu_worker.quant.int4_format import Int4Config
    from treadle.gpu_worker.quant.int4_linear import Int4Method, finish_int4

    torch.manual_seed(0)
    k, n = 1024, 512
    parts = [gptq_quantize(torch.randn(n, k) * 0.05, 128, sym=False, desc_act=True, seed=3) for _ in range(2)]
    with torch.device("cuda"), quantized_layers(Int4Method(Int4Config("gptq", 128, True, 1))):
        layer = MergedColumnParallelLinear(k, [n, n])
    for sid, (qw, qz, sc, g_idx, _) in enumerate(parts):
        for name, t in {"qweight": qw, "qzeros": qz, "scales": sc, "g_idx": g_idx}.items():
            getattr(layer, name).weight_loader(getattr(layer, name), t, sid)
    finish_int4(layer)
    assert layer.int4_perm is not None
    dense = torch.cat([p[4] for p in parts]).cuda()
    for m in (1, 3, 16, 300):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        assert _rel_err(layer(x), x.float() @ dense.T) < 1e-2, m
    x = torch.zeros(2, k, device="cuda", dtype=torch.bfloat16)
    layer(x)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    for seed in range(3):
        x.copy_(torch.randn(2, k, generator=torch.Generator().manual_seed(seed)).to("cuda", torch.bfloat16))
        graph.replay()
        assert _rel_err(y, x.float() @ dense.T) < 1e-2


def dequantized_cases() -> list[str]:
    """Dequantize + matmul, in chunks of 128 rows (the smallest)."""
    from treadle.gpu_worker.layers import triton_int4

    triton_int4.DEQUANT_CHUNK = 1
    return run_cases("cpu", torch.float32, CPU_CASES[7:10] + [(6, 256, 300, 64, True, 1, None)], Tile("deq"))


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (set before triton loads)"
    print(json.dumps({"float32": run_cases("cpu", torch.float32, CPU_CASES),
                      "float16": run_cases("cpu", torch.float16, CPU_CASES[::2]),
                      "dequantized": dequantized_cases()}))
