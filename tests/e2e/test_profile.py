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


def test_profile_from_a_later_step_for_some_steps(engine, tmp_path):
    """``start_step`` (absolute, as SGLang) defers the start; ``num_steps`` ends it by itself."""
    with pytest.raises(ValueError, match="start_step"):
        engine.start_profile(start_step=-1)
    step = engine.get_server_info()["internal_states"][0]["step"]
    out = tmp_path / "later"
    engine.start_profile(output_dir=str(out), start_step=step + 3, num_steps=2, activities=["CPU"])
    engine.generate(prompt="One", sampling_params={"max_new_tokens": 1})  # step + 1
    assert not out.exists() or not os.listdir(out)  # not started yet
    engine.generate(prompt="Two", sampling_params={"max_new_tokens": 8, "ignore_eos": True})  # steps + 2 .. + 9
    files = os.listdir(out)
    assert len(files) == 1  # started at step + 3, stopped itself after 2 steps
    engine.start_profile(output_dir=str(out), start_step=10**9)  # a deferred start can be cancelled
    engine.stop_profile()
    with pytest.raises(RuntimeError, match="not in progress"):
        engine.stop_profile()
