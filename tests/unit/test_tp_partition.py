from __future__ import annotations

import pytest

from treadle.gpu_worker.layers.linear import head_partition


@pytest.mark.parametrize("heads, kv, tp", [(9, 3, 2), (9, 3, 3), (32, 8, 2), (32, 8, 4), (32, 8, 3), (32, 4, 8),
                                          (16, 2, 4), (8, 8, 1), (12, 1, 4)])
def test_partitions_cover_every_head_once(heads, kv, tp):
    parts = [head_partition(heads, kv, tp, r) for r in range(tp)]
    q = [h for qs, qc, _, _ in parts for h in range(qs, qs + qc)]
    assert q == list(range(heads))  # every query head exactly once, in order
    group = heads // kv
    for qs, qc, ks, kc in parts:
        # each rank's query heads read only the KV heads it holds
        assert {h // group for h in range(qs, qs + qc)} <= set(range(ks, ks + kc))
    kv_heads = {h for _, _, ks, kc in parts for h in range(ks, ks + kc)}
    assert kv_heads == set(range(kv))


def test_impossible_split_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot be split"):
        head_partition(6, 2, 4, 0)
