"""``layers/int4_tiles.py``: which tile a 4-bit product gets (pure functions, no GPU)."""

from __future__ import annotations

import pytest

from treadle.gpu_worker.layers import int4_tiles
from treadle.gpu_worker.layers.int4_tiles import Tile, bucket, choose, heuristic


@pytest.fixture
def table(monkeypatch):
    monkeypatch.setattr(int4_tiles, "TABLE", {(4096, 14336, 1): ("fma", 1, 16, 512, 4, 1, 3),
                                              (6144, 4096, 1): ("fma", 1, 8, 512, 4, 1, 2),
                                              (6144, 4096, 256): ("deq", 16, 64, 128, 4, 3, 0)})
    choose.cache_clear()
    yield
    choose.cache_clear()


def test_buckets_round_up_and_stop_at_the_last():
    assert [bucket(m) for m in (1, 2, 3, 5, 16, 17, 200, 257, 1024, 1025, 100000)] == \
        [1, 2, 4, 8, 16, 32, 256, 1024, 1024, 4096, 4096]


def test_the_table_then_the_nearest_shape_then_the_heuristic(table):
    assert choose(1, 4096, 14336) == Tile("fma", 1, 16, 512, 4, 1, 3)  # measured
    assert choose(1, 4096, 12288) == Tile("fma", 1, 16, 512, 4, 1, 0)  # nearest size, split re-derived
    assert choose(1, 3072, 4096) == Tile("fma", 1, 8, 512, 4, 1, 0)  # TP-2 qkv
    assert choose(1, 4096, 7168) == Tile("fma", 1, 8, 512, 4, 1, 0)  # TP-2 down: nearer qkv's size than down's
    assert choose(200, 57344, 8192) == Tile("deq", 16, 64, 128, 4, 3, 0)  # only shape of its bucket
    assert choose(3, 4096, 4096) == heuristic(3, 4096, 4096)  # nothing measured in bucket 4


def test_the_heuristic_covers_every_row_count_and_kinds_are_checked():
    kinds = {heuristic(m, 4096, 4096).kind for m in (1, 2, 3, 16, 17, 64, 256, 1000, 1024, 4096)}
    assert kinds == {"fma", "dot", "deq"}
    with pytest.raises(ValueError, match="kind"):
        Tile("gemv")


def test_every_table_row_is_a_tile_its_bucket_can_run():
    """The pasted table (``int4_sweep.py``'s output): known kinds, CUDA-core GEMV rows only for
    small buckets (its registers grow with M), power-of-two blocks."""
    for (n, k, b), row in int4_tiles.TABLE.items():
        tile = Tile(*row)
        assert b in int4_tiles.M_BUCKETS and n > 0 and k % 32 == 0
        assert tile.kind != "fma" or b <= int4_tiles.FMA_MAX_M, (n, k, b)
        assert all(v & (v - 1) == 0 for v in (tile.block_m, tile.block_n, tile.block_k)), (n, k, b)
