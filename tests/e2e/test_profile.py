"""start_profile / stop_profile as the usage guide calls them: a trace file per worker."""

from __future__ import annotations

import gzip
import json
import os
import re
import time

import pytest

from treadle import Engine

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


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, default_model_dir) -> str:
    """A random one-layer Llama (hidden size 64) with the default model's tokenizer. The usage
    guide's 100 requests are 5,000 forward steps: the default model (30 layers, about 12,000 trace
    events a step) takes most of an hour for them on two CPU cores, and makes some 60 million
    events, far more memory to collect (about 1.5 KB an event, torch's cost) than a test machine has."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = str(tmp_path_factory.mktemp("tiny_llama"))
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def count_in_gzip(path: str, needle: bytes) -> tuple[bytes, bytes, int]:
    """The decompressed file's first and last bytes and how often ``needle`` occurs, streamed (the
    trace is over a gigabyte of JSON); reading to the end checks the gzip CRC: the file is whole."""
    head, tail, count = b"", b"", 0
    with gzip.open(path) as f:
        while chunk := f.read(1 << 24):
            head = head or chunk[:200]
            buf = tail + chunk
            count += buf.count(needle)
            tail = buf[-(len(needle) - 1):]
            last = buf[-200:]
    return head, last, count


def test_usage_guide_profiling_example(tiny_model_dir, tmp_path, monkeypatch, capfd):
    """The guide's example as written (only the model changed), 100 requests on the CPU:
    stop_profile returns once the trace is on disk, however long the export (a minute here, with
    the GIL held for most of it: the worker's heartbeats go on from a helper process), and says so
    in the worker's log."""
    monkeypatch.chdir(tmp_path)
    with Engine(model_path=tiny_model_dir, log_level="info") as engine:
        t0 = time.monotonic()
        engine.start_profile(
            profile_name="my_profile",
            profile_dir="./profiles"
        )

        # Run some requests
        for i in range(100):
            engine.generate(prompt=f"Request {i}", sampling_params={"max_new_tokens": 50})

        t1 = time.monotonic()
        engine.stop_profile()
        t2 = time.monotonic()
        files = os.listdir("profiles")  # the trace, whole, and no side file
        assert len(files) == 1 and re.fullmatch(r"my_profile-[0-9.]+-TP-0\.trace\.json\.gz", files[0]), files
        assert engine.generate(prompt="Still serving", sampling_params={"max_new_tokens": 2})["meta_info"][
            "completion_tokens"] == 2  # the worker was not taken for a frozen one during the export
    log = capfd.readouterr().err
    start = re.search(r"stop_profile: writing the trace of (\d+) forward steps to (\S+)", log)
    done = re.search(r"stop_profile: trace written: (\S+) \(([\d.]+) MB; ([\d.]+) MB of JSON\) in ([\d.]+) s "
                     r"\(collecting the events ([\d.]+) s", log)
    assert start and done, log[-2000:]
    steps = int(start.group(1))
    assert steps >= 100 and start.group(2) == done.group(1) == str(tmp_path / "profiles" / files[0])
    head, last, linears = count_in_gzip(os.path.join("profiles", files[0]), b'"name": "aten::linear"')
    assert head.lstrip().startswith(b"{") and b'"schemaVersion"' in head and last.rstrip().endswith(b"}")
    assert linears >= steps  # every forward step is in it
    print(f"\n100 requests: {t1 - t0:.0f} s, {steps} steps; stop_profile {t2 - t1:.0f} s "
          f"(collecting the events {done.group(5)} s); trace {done.group(2)} MB, {done.group(3)} MB of JSON")
