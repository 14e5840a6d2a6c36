"""The fleet's status file: written by the supervisor (every second, and as it stops), read by
``treadle fleet status`` and ``treadle fleet down`` from any shell. JSON, replaced atomically."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from typing import TYPE_CHECKING, Any, Optional

from treadle.deploy.proc_tree import alive

if TYPE_CHECKING:
    from treadle.deploy.spec import FleetSpec
    from treadle.deploy.supervisor import Supervisor

WRITE_EVERY_S = 1.0
_GAUGE = re.compile(r"^treadle:(num_running_reqs|num_queue_reqs)\{[^}]*\}\s+([0-9.eE+-]+)", re.M)


def parse_loads(metrics_text: str) -> tuple[int, int]:
    """Running and waiting requests from a worker's Prometheus text."""
    found = {name: int(float(v)) for name, v in _GAUGE.findall(metrics_text)}
    if "num_running_reqs" not in found:
        raise ValueError("no treadle:num_running_reqs in the worker's /metrics")
    return found["num_running_reqs"], found.get("num_queue_reqs", 0)


class StatusWriter:
    def __init__(self, spec: "FleetSpec", sup: "Supervisor") -> None:
        self.spec, self.sup = spec, sup

    def snapshot(self) -> dict[str, Any]:
        s = self.spec
        workers = [{"name": w.spec.name, "pid": w.handle.pid, "gpus": w.spec.gpus, "url": w.url,
                    "state": w.state, "since": w.since, "restarts": w.restarts, "crashes": w.crashes,
                    "running": w.running, "waiting": w.waiting, "error": w.error,
                    "log": getattr(w.handle, "log_path", None),
                    "actor_pid": getattr(w.handle, "actor_pid", None)} for w in self.sup.workers.values()]
        return {"name": s.name, "backend": s.backend, "pid": os.getpid(), "phase": self.sup.phase,
                "router": f"http://{s.host}:{s.router.port}", "updated": time.time(),
                "inflight": self.sup.router.inflight, "workers": workers}

    def write_now(self) -> None:
        os.makedirs(self.spec.state_dir, exist_ok=True)
        tmp = self.spec.status_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.snapshot(), f, indent=1)
        os.replace(tmp, self.spec.status_path)

    async def loop(self) -> None:
        while True:
            self.write_now()
            await asyncio.sleep(WRITE_EVERY_S)


def read_status(path: str) -> Optional[dict[str, Any]]:
    """The last status written at ``path`` (None if there is none); ``phase`` says ``gone`` when
    the supervisor that wrote it no longer runs without having said it stopped."""
    try:
        with open(path) as f:
            status = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if status.get("phase") != "stopped" and not alive(int(status.get("pid", 0))):
        status["phase"] = "gone"
    return status


def format_table(status: dict[str, Any]) -> str:
    """``treadle fleet status``'s text: the fleet's line, then one row per worker."""
    head = (f"fleet {status['name']} ({status['backend']}): {status['phase']}, supervisor pid {status['pid']}, "
            f"router {status['router']}, {status.get('inflight', 0)} request(s) in flight")
    cols = ("WORKER", "PID", "GPUS", "URL", "STATE", "RESTARTS", "RUNNING", "WAITING")
    rows = [cols]
    for w in status["workers"]:
        rows.append((w["name"], str(w["pid"] or "-"), ",".join(map(str, w["gpus"])) or "cpu", w["url"] or "-",
                     w["state"], str(w["restarts"]), _num(w["running"]), _num(w["waiting"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = [head] + ["  ".join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip() for r in rows]
    lines += [f"{w['name']}: {w['error']}" for w in status["workers"] if w["error"] and w["state"] != "healthy"]
    return "\n".join(lines)


def _num(v: Optional[int]) -> str:
    return "-" if v is None else str(v)
