"""Launch settings of the 4-bit products (``triton_int4.py``), from a table measured on an H100.

A ``Tile`` names a path and its settings:

- ``fma``: the CUDA-core GEMV (``triton_int4_gemv.py``) for a few rows, ``block_n`` outputs x
  ``block_k`` inputs a step (``block_m`` is always M rounded up to a power of two);
- ``dot``: the tensor-core GEMM (``triton_int4.py``), ``block_m x block_n`` outputs, ``block_k``
  inputs a step, ``stages`` software-pipelined loads; ``dot_wx``: the same, computed as
  ``W x^T`` (the weight the left operand);
- ``deq``: the weight dequantized a chunk at a time, then cuBLAS (long prefills, bound by compute);

and ``split``, the K parts (split-K: a narrow layer still fills the GPU; the last program of a
tile to finish adds them up). ``TABLE`` holds the best tile of each Llama-3.1-8B projection
(key ``(N, K, M bucket)``), written by ``bench/kernels/int4_sweep.py`` on an H100; other shapes
get the nearest measured shape's tile (``choose``), and ``heuristic``'s while the table is empty.
Nothing autotunes at run time: a CUDA graph captures whatever a shape gets on its first call.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)
KINDS = ("fma", "dot", "dot_wx", "deq")
FMA_MAX_M = 16  # the CUDA-core GEMV's rows at most (its registers grow with them)
MAX_TILES = 8192  # split-K counters a device keeps (each launch resets those it used)


@dataclass(frozen=True)
class Tile:
    kind: str  # "fma" | "dot" | "dot_wx" | "deq"
    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    warps: int = 4
    stages: int = 3
    split: int = 0  # K parts; 0: as many as fill the GPU (``split_k``)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Tile.kind must be one of {KINDS}, not {self.kind!r}")


# (N, K, M bucket) -> (kind, block_m, block_n, block_k, warps, stages, split): paste the dict that
# ``python bench/kernels/int4_sweep.py`` prints here (H100, group 128). Empty: ``heuristic`` for all.
TABLE: dict[tuple[int, int, int], tuple] = {}


def bucket(m: int) -> int:
    """The smallest bucket holding ``m`` rows (the last one for more)."""
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


def split_k(tiles: int, steps: int, sms: int, per_sm: int = 4) -> int:
    """K parts for about ``per_sm`` programs an SM, each keeping >= 2 K steps (1 where the tiles
    would overrun the counters)."""
    if tiles > MAX_TILES:
        return 1
    return max(1, min(-(-per_sm * sms // tiles), steps // 2))


def heuristic(m: int, n: int, k: int) -> Tile:
    """A tile for a shape the table lacks (untuned guesses in the table's spirit)."""
    if m <= 2:  # 2 rows of the weight a thread (int4_sweep.FMA says why)
        return Tile("fma", block_m=m, block_n=32, block_k=256, warps=4)
    if m <= 16:
        return Tile("dot", block_m=16, block_n=64, block_k=128, warps=4, stages=4)
    if m <= 32:
        return Tile("dot", block_m=32, block_n=64, block_k=128, warps=4, stages=4)
    if m <= 64:
        return Tile("dot", block_m=64, block_n=64, block_k=64, warps=4, stages=4, split=0)
    if m <= 256:
        return Tile("dot", block_m=64, block_n=128, block_k=64, warps=4, stages=3, split=1)
    if m < 1024:
        return Tile("dot", block_m=128, block_n=128, block_k=64, warps=8, stages=3, split=1)
    return Tile("deq")


@functools.lru_cache(maxsize=4096)
def choose(m: int, n: int, k: int) -> Tile:
    """The table's tile for this shape; for a shape it lacks, the tile measured for the nearest
    weight in the same M bucket (closest size, then closest N: TP shards and other models of the
    family), its split re-derived for this grid; without any, ``heuristic``'s."""
    b = bucket(m)
    row = TABLE.get((n, k, b))
    if row is not None:
        return Tile(*row)
    near = [key for key in TABLE if key[2] == b]
    if not near:
        return heuristic(m, n, k)
    key = min(near, key=lambda t: (abs(math.log(t[0] * t[1] / (n * k))), abs(math.log(t[0] / n))))
    tile = Tile(*TABLE[key])
    return tile if tile.kind == "deq" else dataclasses.replace(tile, split=0)
