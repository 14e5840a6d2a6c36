"""The sampler's Triton argmax (``layers/triton_argmax.py``) against ``torch.argmax(x, dim=-1)``: the
same int64 indices, bit for bit, ties and NaNs included.

Every case builds its rows on the device it runs on and compares with torch's argmax there. Kinds:
random rows; equal maxima placed in one chunk and in different chunks (on chunk and tile edges)
over a background with many ties of its own; all ``-inf`` rows; NaNs (after a ``+inf``, several,
negative ones, whole rows) and ``+inf`` ties; ``-0.0`` against ``0.0`` as the maximum; a row-strided
slice of a wider tensor at an odd offset; a column-strided (transposed) input. On the CPU in
Triton's interpreter (a child process, as in ``test_fused_ops.py``) at small sizes with the chunk
count forced (one chunk: the one-launch path; several: the chunk loop and the merge); on CUDA at
vocabulary sizes, in float32 and bfloat16, and inside a CUDA graph.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from kernel_helpers import interpret_script, interpreter_runs_loops

KINDS = ("randn", "ties", "neg_inf", "nan", "zeros", "strided", "transposed")
INF, NAN = float("inf"), float("nan")


def _positions(gen: torch.Generator, v: int, k: int) -> list[int]:
    """``k`` distinct columns: chunk and tile edges, the middle, the end, and random ones."""
    edges = [2047, 2048, 4095, 4096, 6143, 6144, v // 3, v // 2, v - 1]
    rand = torch.randint(0, v, (8,), generator=gen).tolist()
    cand = sorted({p for p in edges + rand if 0 <= p < v})
    return [cand[i] for i in torch.randperm(len(cand), generator=gen)[:k].tolist()]


def build(kind: str, n: int, v: int, seed: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=gen)
    for r in range(n):
        if kind == "ties":  # 1-3 equal maxima (none in every 4th row: the background's own ties win)
            x[r] = torch.randint(0, 50, (v,), generator=gen).float() - 100
            if r % 4 != 3:
                x[r, _positions(gen, v, 1 + r % 3)] = 7.0
        elif kind == "neg_inf" and r % 3 != 2:
            x[r] = -INF
        elif kind == "nan":
            p = _positions(gen, v, 3)
            if r % 5 == 0:  # +inf before (and after) a NaN: the NaN wins
                x[r, p[1:]] = INF
                x[r, p[0]] = NAN
            elif r % 5 == 1:  # several NaNs, one negative: the first wins
                x[r, p] = torch.tensor([NAN, -NAN, NAN])[:len(p)]
            elif r % 5 == 2:
                x[r] = NAN
            elif r % 5 == 3:  # +inf ties, no NaN
                x[r, p] = INF
            else:
                x[r, -1] = NAN
        elif kind == "zeros":  # max is zero, -0.0 == 0.0: the first of them
            x[r] = -torch.rand(v, generator=gen) - 0.5
            p = _positions(gen, v, 2)
            x[r, p] = torch.tensor([-0.0, 0.0] if r % 2 else [0.0, -0.0])[:len(p)]
    x = x.to(device, dtype)
    if kind == "strided":  # rows of stride v + 13 starting 3 columns in: not 16-byte aligned
        wide = torch.randn(n, v + 13, generator=gen).to(device, dtype)
        wide[:, 3:3 + v] = x
        x = wide[:, 3:3 + v]
    elif kind == "transposed":
        x = x.t().contiguous().t()
    return x


def check(kind: str, n: int, v: int, device: str, dtype: torch.dtype, parts=None) -> str:
    """'' when ``argmax_rows`` equals ``torch.argmax``, else what differs."""
    from treadle.gpu_worker.layers.triton_argmax import argmax_rows

    x = build(kind, n, v, n * 1009 + v, device, dtype)
    x0 = x.clone()
    got, want = argmax_rows(x, parts), torch.argmax(x, dim=-1)
    if not torch.equal(x.view(torch.int16 if x.element_size() == 2 else torch.int32),
                       x0.view(torch.int16 if x.element_size() == 2 else torch.int32)):
        return "input modified"
    if got.shape != want.shape or got.dtype != torch.int64 or got.device != want.device:
        return f"got {got.shape} {got.dtype} {got.device}, want {want.shape} {want.dtype} {want.device}"
    bad = (got != want).nonzero().flatten().tolist()
    return f"rows {bad[:5]}: got {got[bad[:5]].tolist()}, want {want[bad[:5]].tolist()}" if bad else ""


# interpreter cases: (kind, n, V, parts, dtype); parts None is plan()'s choice
SMALL = [(k, n, v, None, torch.float32) for k in KINDS for n in (1, 5) for v in (1, 7, 3000)]
SMALL += [(k, n, 10_000, p, torch.float32) for k in KINDS for n, p in ((1, None), (3, 1), (2, 2), (5, 3))]
SMALL += [("ties", 3, 5000, None, torch.bfloat16), ("nan", 5, 5000, 2, torch.float16)]


def _name(kind, n, v, parts, dtype) -> str:
    return f"{kind}-n{n}-V{v}-P{parts}-{str(dtype)[6:]}"


@pytest.fixture(scope="module")
def interpreted() -> dict[str, str]:
    if not interpreter_runs_loops():  # the chunk loop has runtime bounds
        pytest.skip("this triton's interpreter fails on numpy >= 2.4")
    return interpret_script(__file__)


@pytest.mark.parametrize("case", SMALL, ids=[_name(*c) for c in SMALL])
def test_interpreted_argmax_matches_torch(interpreted: dict[str, str], case):
    assert interpreted[_name(*case)] == "", interpreted[_name(*case)]


def test_torch_semantics_matched():
    """What is matched, spelled out (torch's CPU argmax; CUDA's ``GreaterOrNan`` is the same rule)."""
    x = torch.tensor([[1.0, INF, NAN, NAN], [-INF] * 4, [-1.0, -0.0, 0.0, 0.0], [3.0, 1.0, 3.0, NAN]])
    assert torch.argmax(x, dim=-1).tolist() == [2, 0, 1, 3]


def test_plan():
    from treadle.gpu_worker.layers.triton_argmax import plan

    assert plan(1, 128_256, 132)[2] == 63  # one 2048-wide tile a program
    assert plan(3, 128_256, 132)[2] == 63 and plan(300, 128_256, 132)[2] == 2 and plan(512, 151_936, 132)[2] == 2
    assert plan(1024, 128_256, 132)[2] == 1
    for n, v, parts in [(1, 1, None), (1, 7, None), (64, 49_152, None), (1, 10_000, 3), (2, 5, 4), (1, 151_936, None)]:
        block, chunk, p = plan(n, v, 132, parts)
        assert chunk % block == 0 and (p - 1) * chunk < v <= p * chunk, (n, v, parts, block, chunk, p)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_argmax_matches_torch(kind: str, dtype: torch.dtype):
    failures = {f"n{n}-V{v}": msg for n in (1, 3, 64, 300) for v in (1, 7, 49_152, 128_256, 151_936)
                if (msg := check(kind, n, v, "cuda", dtype))}
    failures.update({f"n{n}-V{v}-P{p}": msg for n, v, p in ((1, 128_256, 1), (3, 151_936, 5), (64, 49_152, 33))
                     if (msg := check(kind, n, v, "cuda", dtype, p))})
    assert failures == {}


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_replay():
    """Captured once (scratch from the graph's pool), replayed on new logits."""
    from treadle.gpu_worker.layers.triton_argmax import argmax_rows

    for n in (1, 600):  # two launches; one launch
        x = torch.randn(n, 128_256, device="cuda")
        argmax_rows(x)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = argmax_rows(x)
        for seed in range(3):
            x.copy_(build("ties", n, 128_256, seed, "cuda", torch.float32))
            graph.replay()
            assert torch.equal(y, torch.argmax(x, dim=-1))


if __name__ == "__main__":  # the interpreter child of `interpreted`
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (set before triton loads)"
    print(json.dumps({_name(*c): check(c[0], c[1], c[2], "cpu", c[4], c[3]) for c in SMALL}))
