"""``dimensions`` checks (Matryoshka truncation), as SGLang words them."""

from __future__ import annotations

import pytest

from treadle.runtime.matryoshka import check_dimensions


def test_full_vector_without_dimensions():
    assert check_dimensions(None, {}, "m") is None


def test_models_must_declare_matryoshka():
    with pytest.raises(ValueError, match="does not support matryoshka representation"):
        check_dimensions(8, {"hidden_size": 64}, "m")
    assert check_dimensions(8, {"hidden_size": 64, "is_matryoshka": True}, "m") == 8


def test_bounds_and_allowed_sizes():
    cfg = {"hidden_size": 64, "is_matryoshka": True}
    with pytest.raises(ValueError, match="greater than 0"):
        check_dimensions(0, cfg, "m")
    with pytest.raises(ValueError, match="greater than max embedding dimension: 64"):
        check_dimensions(65, cfg, "m")
    with pytest.raises(ValueError, match=r"only supports \[16, 32\]"):
        check_dimensions(20, {"hidden_size": 64, "matryoshka_dimensions": [16, 32]}, "m")
    with pytest.raises(TypeError, match="dimensions must be an int"):
        check_dimensions(True, cfg, "m")
