"""Index data goes to the device in one copy, each part on a 16-byte boundary (Triton compiles a
kernel variant per pointer alignment, so unaligned views would compile mid-serving)."""

from __future__ import annotations

import pytest
import torch

from treadle.gpu_worker.host_to_device import to_device_segments


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_segments_are_aligned_and_hold_their_values(dtype):
    parts = [[1, 2, 3], [], [4], [5, 6, 7, 8, 9], [10, 11]]
    views = to_device_segments(parts, dtype, "cpu")
    assert [v.tolist() for v in views] == parts
    assert all(v.dtype == dtype and v.data_ptr() % 16 == 0 for v in views)


def test_views_write_through_to_one_buffer():
    a, b = to_device_segments([[1, 2, 3], [7, 8]], torch.int64, "cpu")
    a[1] = 20
    assert a.tolist() == [1, 20, 3] and b.tolist() == [7, 8]
