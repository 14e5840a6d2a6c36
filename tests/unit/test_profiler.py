"""The worker's profiler on the CPU: the trace is whole on disk when ``stop`` returns, the export is
logged, and a helper process beats for the worker while the export holds the interpreter."""

from __future__ import annotations

import gzip
import json
import logging
import os
import signal
import subprocess
import sys
import time

import msgspec
import pytest
import torch
import zmq

from treadle.gpu_worker import profiler as profiler_module
from treadle.gpu_worker import proxy_heartbeat
from treadle.gpu_worker.profiler import Profiler
from treadle.gpu_worker.proxy_heartbeat import beats_while_busy, main_thread_cpu_ticks
from treadle.runtime.messages import Heartbeat


def some_steps(prof: Profiler, n: int) -> None:
    x = torch.randn(8, 8)
    for _ in range(n):
        torch.nn.functional.linear(x, x).relu()
        prof.step()


def test_stop_returns_with_the_trace_written_and_logs_it(tmp_path, caplog):
    states = []

    class Busy:  # what the worker wraps the export in (the helper process's heartbeats)
        def __enter__(self):
            states.append(("enter", os.listdir(tmp_path)))

        def __exit__(self, *exc):
            states.append(("exit", sorted(os.listdir(tmp_path))))

    prof = Profiler("TP-0", cuda=False, busy=Busy)
    path = prof.start({"profile_name": "p", "profile_dir": str(tmp_path), "profile_id": "1"})["trace"]
    assert path == str(tmp_path / "p-1-TP-0.trace.json.gz")
    some_steps(prof, 3)
    with caplog.at_level(logging.INFO, logger="treadle.worker"):
        assert prof.stop() == {"trace": path}
    assert states == [("enter", []), ("exit", ["p-1-TP-0.trace.json.gz"])]  # no side file left behind
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    assert any(e.get("name") == "aten::linear" for e in events)
    start, done = [r.getMessage() for r in caplog.records]
    assert start == f"stop_profile: writing the trace of 3 forward steps to {path}"
    assert done.startswith(f"stop_profile: trace written: {path} (") and "MB of JSON) in " in done
    assert "collecting the events" in done and "compressing" in done


def test_a_failed_export_leaves_no_partial_file(tmp_path, monkeypatch):
    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(profiler_module.shutil, "copyfileobj", disk_full)
    prof = Profiler("TP-0", cuda=False)
    prof.start({"output_dir": str(tmp_path)})
    some_steps(prof, 1)
    with pytest.raises(OSError, match="No space left"):
        prof.stop()
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError, match="not in progress"):
        prof.stop()


def test_cpu_ticks_of_the_main_thread():
    assert isinstance(main_thread_cpu_ticks(os.getpid()), int)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert main_thread_cpu_ticks(child.pid) is not None
        os.kill(child.pid, signal.SIGSTOP)
        time.sleep(0.2)
        assert main_thread_cpu_ticks(child.pid) is None  # stopped: no beats for it
    finally:
        child.kill()
        child.wait()
    assert main_thread_cpu_ticks(child.pid) is None  # gone


def beats_in(sock: zmq.Socket, seconds: float) -> list[str]:
    names, end = [], time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if sock.poll(int(left * 1000)):
            names.append(msgspec.msgpack.decode(sock.recv(), type=Heartbeat).name)
    return names


@pytest.fixture
def inbox(tmp_path):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    endpoint = f"ipc://{tmp_path}/inbox"
    sock.bind(endpoint)
    yield endpoint, sock
    sock.close(linger=0)
    ctx.term()


def test_helper_beats_while_the_worker_works_and_exits_after(inbox):
    endpoint, sock = inbox
    with beats_while_busy(endpoint, "worker0") as helper:
        end = time.monotonic() + 3.5
        while time.monotonic() < end:  # working: the main thread uses CPU time
            sum(range(10_000))
        assert set(beats_in(sock, 0.5)) == {"worker0"}
        beats_in(sock, 1.5)  # one may still come for the last second of work
        assert beats_in(sock, 2.5) == []  # idle: no beats (a worker wedged in a wait is still found out)
    assert helper.poll() is not None  # gone once the export is done


def test_helper_beats_only_for_a_running_process(inbox):
    endpoint, sock = inbox
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    helper = subprocess.Popen([sys.executable, "-m", proxy_heartbeat.__name__, endpoint, "worker3", str(busy.pid)],
                              stdin=subprocess.PIPE)
    try:
        assert beats_in(sock, 4)[-1:] == ["worker3"]
        os.kill(busy.pid, signal.SIGSTOP)  # frozen: the helper does not cover for it
        beats_in(sock, 1.5)  # one may have been on its way
        assert beats_in(sock, 2.5) == []
        busy.kill()
        busy.wait()
        helper.stdin.close()
        helper.wait(timeout=10)
    finally:
        for p in (busy, helper):
            if p.poll() is None:
                p.kill()
                p.wait()
