"""A fleet on two GPUs (skipped on machines with fewer): each worker sees only its own card
(``CUDA_VISIBLE_DEVICES`` from the spec's ``gpus``), both serve through the router, and the engine
of each runs on CUDA. The throughput check (acceptance 6) is ``bench/fleet_bench.py``."""

from __future__ import annotations

import os
import signal
import subprocess

import httpx
import pytest

from tests.e2e.fleet_helpers import AUTH, Fleet, run_load, unrelated, write_spec
from tests.e2e.gpu_helpers import needs_gpus

pytestmark = [pytest.mark.e2e, *needs_gpus(2)]

WORKERS = """
[[workers]]
name = "g0"
gpus = [0]
[[workers]]
name = "g1"
gpus = [1]
"""


def environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(kv.split("=", 1) for kv in f.read().decode(errors="replace").split("\0") if "=" in kv)


def test_two_workers_one_gpu_each(tmp_path):
    port = write_spec(str(tmp_path / "fleet.toml"), WORKERS)
    fleet = Fleet(str(tmp_path / "fleet.toml"), port)
    try:
        fleet.wait_for("both GPU workers healthy",
                       lambda: [w["state"] for w in fleet.status()["workers"]] == ["healthy", "healthy"], 600)
        assert [environ(fleet.worker(n)["pid"]).get("CUDA_VISIBLE_DEVICES") for n in ("g0", "g1")] == ["0", "1"]
        for name in ("g0", "g1"):
            info = httpx.get(f"{fleet.worker(name)['url']}/get_server_info", headers=AUTH, timeout=30).json()
            assert info["device"] == "cuda"
        outs = run_load(fleet.url, unrelated(40, seed=21), max_new_tokens=16)
        assert all(o.status == 200 for o in outs) and {o.worker for o in outs} == {"g0", "g1"}
    finally:
        if fleet.proc.poll() is None:
            os.kill(fleet.proc.pid, signal.SIGTERM)  # drain and stop; SIGKILL only if that hangs
            try:
                fleet.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                fleet.kill()
