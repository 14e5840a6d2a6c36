"""``python -m treadle.serve`` as a real process: what a supervisor relies on.

(a) SIGKILL of the engine's worker: ``/health`` turns 503 (or the connection is refused) within
seconds and the process exits non-zero, no child left. (b) SIGTERM with streams in flight: they
all complete, the process exits 0, no child left. Two server starts, the slowest part here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

import httpx
import pytest

from tests.e2e.serve_helpers import free_port
from treadle.deploy.proc_tree import descendants as children_of

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Server:
    """``python -m treadle.serve`` in its own process group, on a free port."""

    def __init__(self, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "treadle.serve", "--model-path", "default", "--port", str(self.port),
             "--log-level", "warning", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=env, start_new_session=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        if not self.ready.wait(120):
            self.kill()
            raise RuntimeError("the server did not print its listening line:\n" + "".join(self.lines))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith(f"Serving default on {self.url}"):
                self.ready.set()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log(self) -> str:
        return "".join(self.lines)

    def ready_lines(self) -> list[str]:
        """Every line (stdout and stderr) announcing the server, once the process has exited."""
        self.reader.join(timeout=10)
        return [line for line in self.lines if "Serving default on http://" in line]


def wait_no_children(pids: list[int], timeout_s: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in pids if os.path.exists(f"/proc/{p}") and "treadle" in cmdline(p)]
    return alive


def test_a_killed_worker_makes_health_503_and_the_server_exit_non_zero() -> None:
    server = Server()
    try:
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        kids = children_of(server.proc.pid)
        workers = [p for p in kids if "treadle.gpu_worker" in cmdline(p)]
        assert len(workers) == 1, [cmdline(p) for p in kids]
        os.kill(workers[0], signal.SIGKILL)
        t0, status = time.monotonic(), None
        while time.monotonic() - t0 < 10:
            try:
                status = httpx.get(f"{server.url}/health", timeout=2).status_code
            except httpx.TransportError:
                status = "refused"
            if status != 200:
                break
            time.sleep(0.1)
        assert status in (503, "refused"), f"/health still {status} 10 s after the worker died"
        code = server.proc.wait(timeout=15)
        assert code != 0, server.log()
        assert "the engine died" in server.log()
        assert wait_no_children(kids) == []
    finally:
        server.kill()


def _stream(url: str, prompt: str, out: dict, key: int) -> None:
    text, last, done = "", None, False
    with httpx.stream("POST", f"{url}/generate", timeout=300, json={
            "text": prompt, "stream": True, "sampling_params": {"max_new_tokens": 32, "temperature": 0,
                                                                "ignore_eos": True}}) as r:
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                last = json.loads(line[6:])
                text += last.get("text", "")
    out[key] = (last, done)


def test_sigterm_lets_streams_in_flight_finish_then_exits_0() -> None:
    server = Server("--graceful-shutdown-timeout", "200")
    try:
        kids = children_of(server.proc.pid)
        out: dict[int, tuple[Optional[dict], bool]] = {}
        threads = [threading.Thread(target=_stream, args=(server.url, f"Story number {i}:", out, i))
                   for i in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60  # SIGTERM once every stream is running
        while time.monotonic() < deadline:
            info = httpx.get(f"{server.url}/get_server_info", timeout=30).json()["internal_states"][0]
            if info["num_running"] == 4:
                break
            time.sleep(0.1)
        os.kill(server.proc.pid, signal.SIGTERM)
        time.sleep(0.3)
        try:  # draining: a new request is refused (or the socket is already closed)
            assert httpx.get(f"{server.url}/health", timeout=5).status_code == 503
        except httpx.TransportError:
            pass
        code = server.proc.wait(timeout=240)
        for t in threads:
            t.join(timeout=10)
        assert code == 0, server.log()
        assert server.ready_lines() == [f"Serving default on {server.url}\n"], server.log()  # once
        assert sorted(out) == [0, 1, 2, 3]
        for last, done in out.values():
            assert done and last is not None
            assert last["meta_info"]["finish_reason"]["type"] == "length", last
            assert last["meta_info"]["completion_tokens"] == 32
        assert wait_no_children(kids) == []
    finally:
        server.kill()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
