"""The fused MoE kernels (``layers/triton_moe.py``, ``triton_moe_route.py``) against the torch path (``layers/moe.py``).

On the CPU in Triton's interpreter (a child process, as in ``test_fused_ops.py``), float32, tiny
shapes: routing, both alignment paths, and the whole fused MoE with and without another rank's
experts (id -1) in the routing. On CUDA (``gpu``) in bfloat16 against the torch path in float32 on
the same weights, tokens 1 to 8,192, experts 8 to 128, top-k 1 to 8, and the routing plus experts
captured in a CUDA graph and replayed with new tokens (so new routing: the counts live on the
device).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import pytest
import torch

from kernel_helpers import interpret_script, interpreter_runs_loops


def make_case(tokens: int, experts: int, hidden: int, inter: int, top_k: int, device: str, dtype: torch.dtype,
              seed: int = 0, drop: float = 0.0):
    """Random tokens, experts and router logits; ``drop``: the share of pairs routed to another
    rank (id -1), as expert parallelism hands them over."""
    from treadle.gpu_worker.layers.moe import route

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden ** 0.5
    w2 = torch.randn(experts, hidden, inter, generator=g) / inter ** 0.5
    weights, ids = route(torch.randn(tokens, experts, generator=g), top_k, True)
    if drop:
        ids = torch.where(torch.rand(ids.shape, generator=g) < drop, -1, ids)
    return x.to(device, dtype), w13.to(device, dtype), w2.to(device, dtype), weights.to(device), ids.to(device)


def check_moe(tokens: int, experts: int, hidden: int, inter: int, top_k: int, device: str, dtype: torch.dtype,
              drop: float = 0.0, config=None, gemv: Optional[bool] = None) -> str:
    """'' when the fused MoE matches the torch path in float32 on the same weights, else why not."""
    from treadle.gpu_worker.layers.moe import moe_torch
    from treadle.gpu_worker.layers.triton_moe import fused_moe

    x, w13, w2, weights, ids = make_case(tokens, experts, hidden, inter, top_k, device, dtype, drop=drop)
    got = fused_moe(x, w13, w2, weights, ids, config, gemv)
    want = moe_torch(x.float(), w13.float(), w2.float(), weights, ids)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    try:
        assert got.shape == x.shape and got.dtype == dtype
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    except AssertionError as e:
        return f"T={tokens} E={experts} H={hidden} I={inter} k={top_k} drop={drop} gemv={gemv}: {e}"
    return ""


def check_align(ids: torch.Tensor, experts: int, block_m: int) -> str:
    """'' when both alignment paths agree and every pair of an expert sits once in its blocks."""
    from treadle.gpu_worker.layers.triton_moe_route import _align_torch, align, padded_size

    one, other = align(ids, experts, block_m), _align_torch(ids, experts, block_m,
                                                            padded_size(ids.numel(), experts, block_m))
    total = int(one[2])
    if total != int(other[2]) or not torch.equal(one[0][:total], other[0][:total]) or not torch.equal(
            one[1][:total // block_m], other[1][:total // block_m]):
        return f"alignment paths differ for {ids.numel()} pairs, E={experts}, BLOCK_M={block_m}"
    sorted_ids, expert_ids = one[0][:total].long(), one[1][:total // block_m].long()
    flat = ids.reshape(-1).long()
    real = sorted_ids < flat.numel()
    block_expert = expert_ids.repeat_interleave(block_m)
    if not torch.equal(flat[sorted_ids[real]], block_expert[real]):
        return "a pair sits in another expert's block"
    valid = ((flat >= 0) & (flat < experts)).nonzero().flatten()
    if not torch.equal(sorted_ids[real].sort().values, valid):
        return "pairs missing or repeated"
    return ""


def run_cases(device: str, dtype: torch.dtype) -> list[str]:
    """The interpreter's cases (tiny: every program of the interpreter is Python)."""
    from treadle.gpu_worker.layers.moe import route
    from treadle.gpu_worker.layers.triton_moe import MoeConfig
    from treadle.gpu_worker.layers.triton_moe_route import fused_route

    failures = []
    logits = torch.randn(5, 12, generator=torch.Generator().manual_seed(1)).to(device)
    for k, renorm in [(1, False), (3, True)]:
        w, ids = fused_route(logits, k, renorm)
        rw, rids = route(logits, k, renorm)
        if not torch.equal(ids.long(), rids) or not torch.allclose(w, rw, atol=1e-6):
            failures.append(f"fused_route k={k} renormalize={renorm}")
    ids = make_case(37, 16, 8, 8, 3, device, dtype, drop=0.2)[4]
    failures += [check_align(ids, 16, bm) for bm in (16, 32)]
    small = MoeConfig(16, 16, 16, 2, 4, 1)
    failures += [check_moe(5, 8, 64, 32, 2, device, dtype, gemv=False),
                 check_moe(5, 8, 64, 32, 2, device, dtype),  # the per-pair GEMVs
                 check_moe(3, 16, 300, 40, 4, device, dtype, drop=0.3, gemv=True),  # K past one block
                 check_moe(3, 16, 48, 40, 4, device, dtype, drop=0.3, config=small),
                 check_moe(40, 8, 32, 32, 1, device, dtype, config=MoeConfig(16, 32, 32, 1, 4, 1)),
                 check_moe(2, 8, 32, 32, 2, device, dtype, drop=1.0),  # every pair another rank's: zeros
                 check_moe(2, 8, 32, 32, 2, device, dtype, drop=1.0, gemv=False)]
    return [f for f in failures if f]


@pytest.fixture(scope="module")
def interpreted() -> list[str]:
    return interpret_script(__file__)


@pytest.mark.skipif(not interpreter_runs_loops(), reason="this Triton's interpreter cannot run loops here")
def test_interpreted_moe_matches_torch(interpreted):
    assert interpreted == []


def test_default_configs_tile_the_products():
    from treadle.gpu_worker.layers.triton_moe import moe_config

    for tokens in (1, 8, 64, 512, 8192):
        for experts, top_k in ((8, 2), (64, 6), (128, 8)):
            cfg = moe_config(tokens, experts, 768, 2048, top_k)
            assert all(b >= 16 and b & (b - 1) == 0 for b in (cfg.block_m, cfg.block_n, cfg.block_k)), cfg


def _hopper_compiler():
    """``compile(kernel, signature, constexprs, **options)`` for sm_90 through Triton's own ptxas,
    which needs no GPU; None where this Triton has no NVIDIA backend."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(90)
    except Exception:
        return None
    return lambda fn, sig, consts, **opts: triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                                          target=GPUTarget("cuda", 90, 32), options=opts)


@pytest.mark.skipif(_hopper_compiler() is None, reason="this Triton cannot compile for NVIDIA GPUs here")
def test_kernels_compile_for_hopper():
    """Every kernel compiles to an sm_90 binary with the engine's default configs in bf16, within the
    card's 227 KB of shared memory: what the interpreter cannot show (types, layouts, tile sizes)."""
    from treadle.gpu_worker.layers import triton_moe as tm, triton_moe_gemv as tg, triton_moe_route as tr

    comp = _hopper_compiler()
    ints = lambda *names: {n: "i32" for n in names}  # noqa: E731
    consts = lambda **kw: ({k: "constexpr" for k in kw}, kw)  # noqa: E731
    sig, c = consts(TOP_K=8, RENORM=True, E_P2=128, K_P2=8)
    comp(tr._route_kernel, {"logits": "*bf16", "weights_out": "*fp32", "ids_out": "*i32", **ints("E", "stride_l"), **sig}, c)
    sig, c = consts(BLOCK_M=16, E_P2=128, CHUNK=64)
    comp(tr._align_kernel, {**{n: "*i32" for n in ("ids", "sorted_ids", "expert_ids", "num_post")},
                            **ints("numel", "E"), **sig}, c, num_warps=8)
    sig, c = consts(TOP_K=8, BLOCK_H=1024)
    comp(tm._sum_kernel, {"rows": "*bf16", "ids": "*i32", "out": "*bf16", **ints("E", "H"), **sig}, c)
    for dt in ("bf16", "fp32"):
        sig, c = consts(BLOCK_N=tg.GATE_UP_BLOCKS[0], BLOCK_K=tg.GATE_UP_BLOCKS[1])
        comp(tg._gate_up_kernel, {"x": f"*{dt}", "w": f"*{dt}", "h": f"*{dt}", "ids": "*i32",
                                  **ints("top_k", "E", "N", "K", "stride_xm", "stride_we", "stride_wn", "stride_hm"),
                                  **sig}, c)
        sig, c = consts(TOP_K=8, BLOCK_N=tg.DOWN_BLOCKS[0], BLOCK_K=tg.DOWN_BLOCKS[1])
        comp(tg._down_sum_kernel, {"h": f"*{dt}", "w": f"*{dt}", "out": f"*{dt}", "ids": "*i64", "weights": "*fp32",
                                   **ints("E", "N", "K", "stride_hm", "stride_we", "stride_wn", "stride_om"), **sig}, c)
    for tokens in (1, 8192):
        cfg = tm.default_config(tokens, 128, 8)
        sig, c = consts(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, IEEE=False)
        common = {"sorted_ids": "*i32", "expert_ids": "*i32", "num_post": "*i32"}
        opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        k = comp(tm._gate_up_kernel, {"x": "*bf16", "w": "*bf16", "out": "*bf16", **common,
                                      **ints("numel", "top_k", "slots", "N", "K", "stride_xm", "stride_we", "stride_wn",
                                             "stride_om"), **sig}, c, **opts)
        assert k.metadata.shared <= 227 * 1024, (cfg, k.metadata.shared)
        k = comp(tm._down_kernel, {"h": "*bf16", "w": "*bf16", "out": "*bf16", "topk_weights": "*fp32", **common,
                                   **ints("numel", "slots", "N", "K", "stride_hm", "stride_we", "stride_wn", "stride_om"),
                                   **sig}, c, **opts)
        assert k.metadata.shared <= 227 * 1024, (cfg, k.metadata.shared)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (tokens, experts, hidden, intermediate per rank, top_k): decode and prefill sizes of Mixtral-,
# Qwen3-30B-A3B- and Qwen1.5-MoE-like layers (60 experts: not a power of two)
GPU_SHAPES = [(1, 8, 1024, 1792, 2), (1, 128, 2048, 768, 8), (3, 60, 1024, 704, 4), (16, 128, 2048, 768, 8),
              (64, 8, 1024, 1792, 2), (200, 64, 512, 320, 6), (256, 128, 2048, 768, 8), (1024, 8, 512, 256, 1),
              (2048, 128, 1024, 384, 8), (8192, 128, 1024, 384, 8), (8192, 8, 512, 512, 2), (5, 128, 256, 96, 1)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "T{}-E{}-H{}-I{}-k{}".format(*s))
def test_cuda_fused_moe_matches_torch(shape):
    msg = check_moe(*shape, "cuda", torch.bfloat16)
    assert msg == "", msg


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("gemv", [True, False])
@pytest.mark.parametrize("shape", [(1, 128, 2048, 768, 8), (4, 8, 1024, 1792, 2), (8, 60, 1024, 704, 4)])
def test_cuda_decode_paths_match_torch(shape, gemv):
    """Both paths at decode sizes: the per-pair GEMVs and the tiled GEMMs (float32 and bf16)."""
    for dtype in (torch.float32, torch.bfloat16):
        msg = check_moe(*shape, "cuda", dtype, gemv=gemv)
        assert msg == "", msg


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(1, 64, 512, 256, 8), (300, 16, 512, 256, 4)])
def test_cuda_fused_moe_skips_other_ranks_experts(shape):
    msg = check_moe(*shape, "cuda", torch.bfloat16, drop=0.4)
    assert msg == "", msg


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("pairs,experts", [(8, 128), (600, 60), (40000, 128)])
def test_cuda_align_paths_agree(pairs, experts):
    ids = torch.randint(-1, experts, (pairs,), generator=torch.Generator().manual_seed(pairs)).view(-1, 1)
    for block_m in (16, 64):
        msg = check_align(ids.cuda(), experts, block_m)
        assert msg == "", msg


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("tokens,top_k", [(1, 8), (4, 2), (64, 8)])
def test_cuda_graph_replays_new_routing(tokens, top_k):
    """Routing and experts captured once, replayed with new tokens: the routing (and so every
    count and block's expert) changes between replays, the graph must follow it."""
    from treadle.gpu_worker.layers.moe import moe_torch, route
    from treadle.gpu_worker.layers.triton_moe import fused_moe
    from treadle.gpu_worker.layers.triton_moe_route import fused_route

    experts, hidden, inter = 128, 512, 256
    x, w13, w2, _, _ = make_case(tokens, experts, hidden, inter, top_k, "cuda", torch.bfloat16)
    gate = torch.randn(experts, hidden, device="cuda") / hidden ** 0.5  # float32 logits: no bf16 ties

    def step() -> torch.Tensor:
        weights, ids = fused_route(x.float() @ gate.T, top_k, True)
        return fused_moe(x, w13, w2, weights, ids)

    step()  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed in range(3):
        x.copy_(torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(10 + seed)).to("cuda", x.dtype))
        graph.replay()
        weights, ids = route(x.float() @ gate.T, top_k, True)
        want = moe_torch(x.float(), w13.float(), w2.float(), weights, ids)
        torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=3e-2)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (set before triton loads)"
    print(json.dumps(run_cases("cpu", torch.float32)))
