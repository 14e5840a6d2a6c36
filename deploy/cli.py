"""``treadle fleet up|status|down SPEC`` (also ``python -m treadle.deploy ...``).

``up`` runs the supervisor and the router in the foreground until SIGTERM/SIGINT (run it under
systemd, tmux or ``nohup``); ``status`` and ``down`` find it through the status file in the
spec's ``state_dir``, so they work from any shell on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from typing import Any, Optional

from treadle.deploy.proc_tree import alive
from treadle.deploy.spec import FleetSpec, load_spec
from treadle.deploy.status import format_table, read_status

DOWN_EXTRA_S = 30.0  # fleet down waits the drain twice (router, then workers) and this much more


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="treadle fleet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in (("up", "start the fleet and supervise it (foreground)"),
                            ("status", "print the workers' table"), ("down", "drain and stop the fleet")):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("spec", help="the fleet spec (TOML; see deploy/examples/fleet.toml)")
        if name == "status":
            cmd.add_argument("--json", action="store_true", help="the status file's JSON instead of a table")
    return p


def handles_for(spec: FleetSpec) -> dict[str, Any]:
    if spec.backend == "ray":
        from treadle.deploy.ray_backend import ray_handles

        return ray_handles(spec)
    from treadle.deploy.local_worker import LocalWorker

    return {w.name: LocalWorker(w, spec) for w in spec.workers}


def up(spec: FleetSpec) -> int:
    status = read_status(spec.status_path)
    if status is not None and status["phase"] not in ("stopped", "gone"):
        print(f"fleet {spec.name} already runs (supervisor pid {status['pid']}); `treadle fleet down` it first.",
              file=sys.stderr)
        return 1
    from treadle.deploy.supervisor import Supervisor

    handles = handles_for(spec)
    try:
        return asyncio.run(Supervisor(spec, handles).run())
    finally:
        closer = getattr(next(iter(handles.values()), None), "close_backend", None)
        if closer is not None:
            closer()


def down(spec: FleetSpec) -> int:
    status = read_status(spec.status_path)
    if status is None or status["phase"] in ("stopped", "gone"):
        print(f"fleet {spec.name} is not running.")
        return 0
    pid = int(status["pid"])
    os.kill(pid, signal.SIGTERM)
    print(f"fleet {spec.name}: draining (supervisor pid {pid})", flush=True)
    deadline = time.monotonic() + 2 * spec.supervisor.drain_timeout_s + DOWN_EXTRA_S
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive(pid):
        os.kill(pid, signal.SIGTERM)  # a second signal: the supervisor stops without waiting
        time.sleep(5)
    if alive(pid):
        print(f"fleet {spec.name}: the supervisor (pid {pid}) did not stop.", file=sys.stderr)
        return 1
    print(f"fleet {spec.name}: stopped")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        spec = load_spec(a.spec)
    except (OSError, ValueError) as e:
        print(f"treadle fleet: {e}", file=sys.stderr)
        return 2
    if a.command == "up":
        return up(spec)
    if a.command == "down":
        return down(spec)
    status = read_status(spec.status_path)
    if status is None:
        print(f"fleet {spec.name}: no status at {spec.status_path} (never started here?)", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=1) if a.json else format_table(status))
    return 0 if status["phase"] in ("running", "starting", "draining") else 3
