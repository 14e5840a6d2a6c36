"""``treadle fleet status``: the status file read back, the table, and the workers' load read
from their Prometheus text."""

from __future__ import annotations

import json
import os

import pytest

from treadle.deploy.cli import main
from treadle.deploy.status import format_table, parse_loads, read_status

WORKER_METRICS = """# HELP treadle:num_running_reqs Requests running
treadle:num_running_reqs{model_name="default"} 3.0
treadle:num_queue_reqs{model_name="default"} 7.0
"""


def test_parse_loads():
    assert parse_loads(WORKER_METRICS) == (3, 7)
    with pytest.raises(ValueError):
        parse_loads("nothing here")


def test_status_table_and_cli(tmp_path, capsys):
    spec = tmp_path / "f.toml"
    spec.write_text('name = "t"\nstate_dir = "st"\nworkers = 2\n')
    assert main(["status", str(spec)]) == 1  # never started
    os.makedirs(tmp_path / "st")
    worker = {"name": "w0", "pid": 123, "gpus": [0, 1], "url": "http://127.0.0.1:30001", "state": "healthy",
              "restarts": 1, "running": 2, "waiting": 0, "error": ""}
    bad = {**worker, "name": "bad", "pid": None, "gpus": [], "url": None, "state": "failed", "restarts": 2,
           "running": None, "waiting": None, "error": "crash loop: 3 crashes in a row"}
    status = {"name": "t", "backend": "local", "pid": os.getpid(), "phase": "running",
              "router": "http://127.0.0.1:30000", "inflight": 0, "workers": [worker, bad]}
    (tmp_path / "st" / "status.json").write_text(json.dumps(status))
    assert read_status(str(tmp_path / "st" / "status.json"))["phase"] == "running"
    assert main(["status", str(spec)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["WORKER", "PID", "GPUS", "URL", "STATE", "RESTARTS", "RUNNING", "WAITING"]
    assert lines[2].split() == ["w0", "123", "0,1", "http://127.0.0.1:30001", "healthy", "1", "2", "0"]
    assert lines[3].split() == ["bad", "-", "cpu", "-", "failed", "2", "-", "-"]
    assert lines[4] == "bad: crash loop: 3 crashes in a row"
    status["pid"] = 2 ** 22 + 7  # no such process: the supervisor is gone
    (tmp_path / "st" / "status.json").write_text(json.dumps(status))
    assert "gone" in format_table(read_status(str(tmp_path / "st" / "status.json")))
    assert main(["down", str(spec)]) == 0 and "not running" in capsys.readouterr().out
