"""start_profile / stop_profile as the usage guide calls them: a trace file per worker."""

from __future__ import annotations

import gzip
import json
import os

import pytest

pytestmark = pytest.mark.e2e


def test_profile_writes_a_trace(engine, tmp_path):
    with pytest.raises(TypeError, match="profile_nmae"):
        engine.start_profile(profile_nmae="typo")
    with pytest.raises(RuntimeError, match="not in progress"):
        engine.stop_profile()
    engine.start_profile(profile_name="my_profile", profile_dir=str(tmp_path / "profiles"))
    with pytest.raises(RuntimeError, match="already in progress"):
        engine.start_profile(profile_dir=str(tmp_path))
    for i in range(2):
        engine.generate(prompt=f"Request {i}", sampling_params={"max_new_tokens": 4})
    engine.stop_profile()
    files = os.listdir(tmp_path / "profiles")
    assert len(files) == 1 and files[0].startswith("my_profile-") and files[0].endswith("-TP-0.trace.json.gz")
    with gzip.open(tmp_path / "profiles" / files[0]) as f:
        trace = json.load(f)
    assert any("forward" in str(e.get("name", "")).lower() or e.get("ph") == "X" for e in trace["traceEvents"])
    assert engine.generate(prompt="Still serving", sampling_params={"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2
