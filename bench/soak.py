"""Soak: fresh engines under mixed load, each ended by one child fault, for an hour by default.

    python bench/soak.py [--minutes 60] [--seed N] [--fault-after 60,240] [--heartbeat-timeout S] [--out FILE]

Each round starts an engine, runs sync and async calls (single, batch, streamed, closed half-read,
with logprobs, aborted, control calls) from seven clients (``bench/chaos.py``), and a random time
(``--fault-after``) after the first result SIGKILLs or SIGSTOPs one child (tokenizer, scheduler,
worker0 or detokenizer). Every call must end with a result of the right shape or
``EngineDeadError`` (no other exception, no hang), a new call must fail at once, and after
``shutdown()`` no process of the engine may be alive, its socket directory gone and no Unix socket
bound under it. Between rounds it records this process's RSS, open fds and threads, so a leak in
the client shows up as a trend over rounds. One JSON line per round (``part: "round"``) and a
``summary`` line go to ``--out`` (bench/common.py's schema); the exit status is 1 if any round
broke a rule or fds or threads grew. docs/soak.md has a run's figures.

``tests/e2e/test_chaos.py`` runs a few short rounds of the same (``run_round``) in the suite.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import signal
import statistics
import time
from typing import Any, Callable, Optional

from chaos import Load

VICTIMS = ("tokenizer", "scheduler", "worker0", "detokenizer")
FAULTS = ("SIGKILL", "SIGSTOP")
DRAIN_MARGIN_S = 20.0  # past the detection bound, a call still running counts as hung (a 2-core CI box is slow)
LATE_CALL_S = 0.5  # a call on a dead engine must fail this fast
FIRST_RESULT_S = 60.0  # the load's first generate result must come this soon (the fault waits for it)


# ---------------------------------------------------------------- what a round leaves behind
def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def session_members(sids: list[int]) -> set[int]:
    """Every live process in the sessions ``sids``: each child runs in a session of its own, so this
    is the children and anything they started (a grandchild outliving the engine is a leak too)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # state ppid pgrp session ...
        except OSError:
            continue
        if int(fields[3]) in sids:
            found.add(int(entry))
    return found


def unix_sockets_under(path: str) -> list[str]:
    """Unix sockets of any process still bound to a path under ``path`` (a removed directory does
    not close them: /proc/net/unix still lists the path)."""
    with open("/proc/net/unix") as f:
        paths = [line.split()[-1] for line in f.readlines()[1:] if len(line.split()) >= 8]
    return [p for p in paths if p.startswith(path.rstrip("/") + "/")]


def client_figures() -> dict[str, Any]:
    """This process's resident memory, open fds and threads (the kernel's count, so ZeroMQ's own
    I/O threads count too), after a collection."""
    gc.collect()
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    return {"rss_mb": round(int(status["VmRSS"].split()[0]) / 1024, 1), "fds": len(os.listdir("/proc/self/fd")),
            "threads": int(status["Threads"])}


# ---------------------------------------------------------------- one round
def run_round(seed: int, victim: str, fault: str, load_s: float, heartbeat_timeout_s: float,
              engine_kwargs: Optional[dict[str, Any]] = None, longest: int = 24,
              log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """A fresh engine under mixed load (calls of at most ``longest`` new tokens); ``load_s`` after
    the load's first result, ``fault`` (SIGKILL or SIGSTOP) of ``victim``; every call must end by
    itself within the detection bound. Returns the round's figures; ``broken_rules`` lists the
    rules they break (empty: the round passed)."""
    from treadle import Engine, EngineDeadError

    before = client_figures()
    t0 = time.monotonic()
    eng = Engine(model_path="default", random_seed=seed % 2**31, **(engine_kwargs or {}))
    fig: dict[str, Any] = {"seed": seed, "victim": victim, "fault": fault, "load_s": round(load_s, 2),
                           "startup_s": round(time.monotonic() - t0, 2)}
    ipc_path, children = eng._ipc.path, eng.get_all_child_pids()
    family = session_members(children) | set(children)
    load = Load(eng, seed, longest)
    try:
        load.start()
        t1 = time.monotonic()
        load.generated.wait(FIRST_RESULT_S)  # the fault comes to an engine that has served
        fig["first_result_s"] = round(time.monotonic() - t1, 2) if load.generated.is_set() else None
        time.sleep(load_s)
        family |= session_members(children)
        log(f"{fault} {victim} (pid {eng._sup.procs[victim].pid}) {load_s:.1f} s after the first result")
        fig.update(_fault_and_drain(eng, load, victim, fault, heartbeat_timeout_s))
        family |= session_members(children)
    finally:
        load.stop()
        t2 = time.monotonic()
        eng.shutdown()
        fig["shutdown_s"] = round(time.monotonic() - t2, 2)
    fig["stuck_after_shutdown"] = load.join(time.monotonic() + 5.0)  # calls that not even shutdown() ended
    time.sleep(0.2)
    fig.update({
        "clients": load.n_clients, "calls_ok": sum(load.ok.values()), "calls_dead": load.dead,
        "ok_by_kind": dict(sorted(load.ok.items())),
        "other_errors": load.other, "dead_messages": sorted(load.dead_messages),
        "leftover_pids": sorted(p for p in family if alive(p)),
        "socket_dir_left": os.path.exists(ipc_path), "unix_sockets_left": unix_sockets_under(ipc_path),
        "io_thread_alive": eng._sup.thread.is_alive(), "client_before": before, "client_after": client_figures(),
    })
    fig["broken_rules"] = broken_rules(fig, EngineDeadError.__name__)
    return fig


def _fault_and_drain(eng: Any, load: Load, victim: str, fault: str, heartbeat_timeout_s: float) -> dict[str, Any]:
    """Send the fault, wait for the engine to notice and for every client to end, then make one
    more call, which must fail at once."""
    with load.lock:
        in_flight = sorted(kind for kind, _ in load.current.values())
    open_calls = len(eng._sup.call_rids)  # the client's table of open calls: more than the clients' is a leak
    at_fault = client_figures()
    dead_before = str(eng._sup.dead) if eng._sup.dead is not None else ""  # nothing was frozen yet
    try:
        os.kill(eng._sup.procs[victim].pid, getattr(signal, fault))
    except ProcessLookupError:  # already killed and reaped (dead_before says why)
        pass
    fault_at = time.monotonic()
    bound = (heartbeat_timeout_s if fault == "SIGSTOP" else 0.0) + DRAIN_MARGIN_S
    while eng._sup.dead is None and time.monotonic() - fault_at < bound:
        time.sleep(0.01)
    detect_s = time.monotonic() - fault_at
    hung = load.join(fault_at + bound)
    drain_s = time.monotonic() - fault_at
    t1 = time.monotonic()
    try:
        eng.generate(prompt="Hi", sampling_params={"max_new_tokens": 2})
        late_call = "a result"
    except BaseException as e:  # noqa: BLE001 - judged by broken_rules
        late_call = type(e).__name__
    return {"in_flight_at_fault": in_flight, "open_calls_at_fault": open_calls, "client_at_fault": at_fault,
            "dead_before_fault": dead_before, "detect_s": round(detect_s, 2),
            "drain_s": round(drain_s, 2), "hung": hung, "late_call": late_call,
            "late_call_s": round(time.monotonic() - t1, 3),
            "dead_message": str(eng._sup.dead) if eng._sup.dead is not None else ""}


def broken_rules(fig: dict[str, Any], dead_name: str = "EngineDeadError") -> list[str]:
    """What a round's figures say went wrong (empty: every rule held)."""
    rules = [
        (not fig["dead_before_fault"], f"the engine died before the fault: {fig['dead_before_fault']!r}"),
        (fig["open_calls_at_fault"] <= fig["clients"], f"{fig['open_calls_at_fault']} calls open in the client for "
                                                       f"{fig['clients']} clients"),
        (fig["first_result_s"] is not None, f"no generate call returned within {FIRST_RESULT_S:.0f} s of load"),
        (not fig["hung"], f"calls still running {DRAIN_MARGIN_S:.0f} s past the detection bound: {fig['hung']}"),
        (not fig["other_errors"], f"calls ended with neither a result nor {dead_name}: {fig['other_errors'][:5]}"),
        (fig["victim"] in fig["dead_message"], f"the engine's error does not name {fig['victim']}: "
                                               f"{fig['dead_message']!r}"),
        (fig["late_call"] == dead_name and fig["late_call_s"] < LATE_CALL_S,
         f"a call on the dead engine gave {fig['late_call']} after {fig['late_call_s']} s"),
        (not fig["leftover_pids"], f"processes alive after shutdown: {fig['leftover_pids']}"),
        (not fig["socket_dir_left"], "the socket directory is still there"),
        (not fig["unix_sockets_left"], f"sockets still bound: {fig['unix_sockets_left']}"),
        (not fig["io_thread_alive"], "the engine's I/O thread is still running"),
    ]
    return [why for held, why in rules if not held]


# ---------------------------------------------------------------- the soak
def summarize(rounds: list[dict[str, Any]], minutes: float) -> dict[str, Any]:
    """The run's totals, the detection times per fault kind, and the client's figures from the
    first round to the last: fds or threads that grow across rounds are a leak."""
    after = [r["client_after"] for r in rounds]
    detect = {f: [r["detect_s"] for r in rounds if r["fault"] == f] for f in FAULTS}
    faults: dict[str, int] = {}
    for r in rounds:
        faults[f"{r['fault']} {r['victim']}"] = faults.get(f"{r['fault']} {r['victim']}", 0) + 1
    fig = {
        "rounds": len(rounds), "minutes": round(minutes, 1), "faults": dict(sorted(faults.items())),
        "calls_ok": sum(r["calls_ok"] for r in rounds), "calls_dead": sum(r["calls_dead"] for r in rounds),
        "other_errors": sum(len(r["other_errors"]) for r in rounds), "hung": sum(len(r["hung"]) for r in rounds),
        "leftover_pids": sum(len(r["leftover_pids"]) for r in rounds),
        "socket_dirs_left": sum(r["socket_dir_left"] for r in rounds),
        "broken_rounds": {i: r["broken_rules"] for i, r in enumerate(rounds) if r["broken_rules"]},
        "detect_s": {f: {"median": round(statistics.median(v), 2), "max": max(v)} for f, v in detect.items() if v},
        "drain_s_max": max(r["drain_s"] for r in rounds), "shutdown_s_max": max(r["shutdown_s"] for r in rounds),
        "startup_s_median": round(statistics.median(r["startup_s"] for r in rounds), 2),
        "client_before": rounds[0]["client_before"],
        "rss_mb_at_fault": [r["client_at_fault"]["rss_mb"] for r in rounds],
        "rss_mb": [a["rss_mb"] for a in after], "fds": [a["fds"] for a in after],
        "threads": [a["threads"] for a in after],
    }
    fig["fds_growth"] = after[-1]["fds"] - after[0]["fds"]
    fig["threads_growth"] = after[-1]["threads"] - after[0]["threads"]
    fig["passed"] = not fig["broken_rounds"] and fig["fds_growth"] <= 0 and fig["threads_growth"] <= 0
    return fig


def main() -> None:
    from common import Results, bench_parser, engine_kwargs

    p = bench_parser(__doc__)
    p.add_argument("--minutes", type=float, default=60.0, help="how long to run (rounds start until then)")
    p.add_argument("--seed", type=int, default=None, help="replay a run (default: a random seed, printed)")
    p.add_argument("--fault-after", default="60,240",
                   help="seconds of load after the first result before a round's fault: MIN,MAX")
    p.add_argument("--heartbeat-timeout", type=float, default=None,
                   help="TREADLE_HEARTBEAT_TIMEOUT_S for the engines (default: the engine's, 10 s)")
    a = p.parse_args()
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(2**32)
    lo, hi = (float(x) for x in a.fault_after.split(","))
    if a.heartbeat_timeout is not None:
        os.environ["TREADLE_HEARTBEAT_TIMEOUT_S"] = str(a.heartbeat_timeout)
    heartbeat = float(os.environ.get("TREADLE_HEARTBEAT_TIMEOUT_S", "10"))
    res = Results("soak", a.out, engine_kwargs(a), seed=seed, heartbeat_timeout_s=heartbeat)
    rng = random.Random(seed)
    start = time.monotonic()
    end = start + a.minutes * 60
    rounds: list[dict[str, Any]] = []
    while time.monotonic() < end:
        victim, fault = rng.choice(VICTIMS), rng.choice(FAULTS)
        load_s = min(rng.uniform(lo, hi), max(1.0, end - time.monotonic()))
        fig = run_round(rng.randrange(2**32), victim, fault, load_s, heartbeat, engine_kwargs(a),
                        log=lambda m: print(f"round {len(rounds)}: {m}", flush=True))
        rounds.append(fig)
        res.record("round", round=len(rounds) - 1, **fig)
    summary = summarize(rounds, (time.monotonic() - start) / 60)
    res.record("summary", **summary)
    print(json.dumps({"passed": summary["passed"], "broken_rounds": summary["broken_rounds"]}), flush=True)
    raise SystemExit(0 if summary["passed"] else 1)


if __name__ == "__main__":
    main()
