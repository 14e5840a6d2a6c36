"""Heartbeats on the worker's behalf while its main thread holds the interpreter for long.

Every child beats once a second from a thread of its own (runtime/procs.py), and the client kills
one that stays silent for 10 s as frozen. That thread runs only when it gets the GIL, and exporting
a profiler trace holds the GIL through two long C++ calls (torch's profiler stop and its JSON
writer: about 8 s a million events, minutes for a long CPU profile), so a worker busy exporting
would be taken for a frozen one. While such a call runs, ``beats_while_busy`` starts a small
helper process that beats for the worker, but only while the worker's main thread is using CPU
time: a worker that is stopped (SIGSTOP) or wedged without working gets no beats from the helper,
and is still declared frozen within the client's bound.

The helper is this module run as ``python -m`` (as the engine's children are; it starts in a
fraction of a second) and exits at the end of its stdin, which is when the worker is done or gone.
"""

from __future__ import annotations

import logging
import os
import select
import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator, Optional

import msgspec
import zmq

from treadle.runtime.messages import Heartbeat

BEAT_S = 1.0  # as runtime/procs.HEARTBEAT_S
logger = logging.getLogger("treadle.worker")


def main_thread_cpu_ticks(pid: int) -> Optional[int]:
    """CPU time (clock ticks) of ``pid``'s main thread; None if it is stopped, a zombie, or gone."""
    try:
        with open(f"/proc/{pid}/task/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)", which may hold spaces
    except (OSError, IndexError):
        return None
    if fields[0] in ("T", "t", "Z", "X", "x"):  # stopped, traced, dead
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15 of proc(5))


@contextmanager
def beats_while_busy(endpoint: str, name: str) -> Iterator[Optional[subprocess.Popen]]:
    """Heartbeats as ``name`` on ``endpoint`` (the client's inbox) from a helper process (yielded)
    while this process's main thread works through the ``with`` body."""
    try:
        helper = subprocess.Popen([sys.executable, "-m", __name__, endpoint, name, str(os.getpid())],
                                  stdin=subprocess.PIPE)
    except OSError as e:  # the work goes on without it: only a long one is then taken for a frozen worker
        logger.warning("no heartbeat helper (%s): an export holding the GIL for over 10 s will fail the engine", e)
        yield None
        return
    try:
        yield helper
    finally:
        assert helper.stdin is not None
        helper.stdin.close()  # its end of input: it exits within a beat
        try:
            helper.wait(timeout=5 * BEAT_S)
        except subprocess.TimeoutExpired:
            helper.kill()
            helper.wait()


def _beat_for(endpoint: str, name: str, pid: int) -> None:
    sock = zmq.Context().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    beat = msgspec.msgpack.encode(Heartbeat(name=name))
    last = main_thread_cpu_ticks(pid)
    # select() on stdin doubles as the pause between beats: it returns at once when the worker
    # closes the pipe, or dies (the pipe closes with it), so the helper never outlives the work.
    while not select.select([sys.stdin], [], [], BEAT_S)[0]:
        ticks = main_thread_cpu_ticks(pid)
        if ticks is not None and last is not None and ticks > last:
            sock.send(beat)
        last = ticks
    sock.close()


if __name__ == "__main__":
    _beat_for(sys.argv[1], sys.argv[2], int(sys.argv[3]))
