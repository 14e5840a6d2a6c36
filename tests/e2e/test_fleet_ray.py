"""``backend = "ray"`` on a local Ray (issue 23's acceptance 5): the same spec as the local fleet's
but for the backend, two workers as Ray actors; both serve through the router; SIGKILL of one
actor's process gets it restarted by Ray and serving again; SIGTERM to the supervisor stops the
actors and the local Ray, leaving no process."""

from __future__ import annotations

import os
import signal

import httpx
import pytest

from tests.e2e.fleet_helpers import API_KEY, no_process_left, run_load, running_fleet, unrelated, write_spec

pytest.importorskip("ray", reason="the Ray backend needs `pip install treadle[ray]`")
pytestmark = pytest.mark.e2e

SPEC = """
backend = "ray"
[ray]
num_cpus = 2
max_restarts = 2
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    d = tmp_path_factory.mktemp("fleet_ray")
    port = write_spec(str(d / "fleet.toml"), "", "workers = 2\n" + SPEC)
    with running_fleet(str(d / "fleet.toml"), port, "both Ray workers healthy",
                       lambda f: [w["state"] for w in f.status()["workers"]] == ["healthy", "healthy"], 300) as f:
        yield f


def test_ray_workers_serve_and_ray_restarts_a_killed_one(fleet):
    outs = run_load(fleet.url, unrelated(8, seed=11), max_new_tokens=2)
    assert all(o.status == 200 for o in outs) and {o.worker for o in outs} == {"w0", "w1"}
    for w in fleet.status()["workers"]:  # the key reached each server in its environment, not its argv
        with open(f"/proc/{w['pid']}/cmdline", "rb") as f:
            assert API_KEY.encode() not in f.read(), w["name"]
        assert httpx.get(f"{w['url']}/get_model_info", timeout=30).status_code == 401, w["name"]

    victim = fleet.worker("w0")
    assert victim["actor_pid"] and victim["actor_pid"] != victim["pid"]
    os.kill(victim["actor_pid"], signal.SIGKILL)
    fleet.wait_for("w0 restarted by Ray", lambda: fleet.worker("w0").get("state") == "healthy"
                   and fleet.worker("w0").get("actor_pid") not in (None, victim["actor_pid"]), 240)
    assert fleet.worker("w0")["restarts"] == 1
    assert no_process_left([victim["pid"]]) == []  # its server died with it
    outs = run_load(fleet.url, unrelated(8, seed=12), max_new_tokens=2)
    assert all(o.status == 200 for o in outs) and "w0" in {o.worker for o in outs}


def test_sigterm_stops_everything(fleet):
    pids = fleet.tree()
    assert len(pids) > 4  # the supervisor, Ray's processes, the actors and their servers
    os.kill(fleet.proc.pid, signal.SIGTERM)
    assert fleet.proc.wait(timeout=120) == 0
    assert no_process_left(pids, timeout_s=30) == []
    assert fleet.status()["phase"] == "stopped"
