"""What the kernel and multi-process tests share: running a test file in Triton's interpreter,
and starting ranks that meet on a free loopback port."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.multiprocessing as mp

from treadle.runtime.parallel import free_loopback_ports

ROOT = Path(__file__).resolve().parents[2]


def interpret_script(test_file: str) -> Any:
    """Run ``test_file`` as a script with ``TRITON_INTERPRET=1`` and return the JSON on the last
    line of its output. A child process: the variable must be set before triton defines the
    kernels, and the interpreter patches ``triton.language`` while it runs, so nothing of it may
    leak into the pytest process."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, os.path.abspath(test_file)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def interpreter_runs_loops() -> bool:
    """Triton < 3.9's interpreter turns a loop bound into an int with ``int(array)``, which
    numpy >= 2.4 refuses for its 1-element arrays: every runtime-bounded loop fails there."""
    import numpy as np

    try:
        int(np.zeros(1))
        return True
    except TypeError:
        import triton

        return tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 9)


def free_port() -> int:
    """A loopback port for a gloo rendezvous, chosen as the engine chooses its own."""
    return free_loopback_ports(1)[0]


class Alloc:
    """Hands out KV locations ``0 .. num_locs-1`` from a shuffled free list (never contiguous by
    accident), so runner tests exercise arbitrary locations."""

    def __init__(self, seed: int, num_locs: int):
        self.free = list(range(num_locs))
        random.Random(seed).shuffle(self.free)

    def __call__(self, n: int) -> list[int]:
        out, self.free = self.free[:n], self.free[n:]
        return out


def run_two_ranks(worker: Callable[[int, int, str], None], tmp_path: Path) -> Any:
    """Start ``worker(rank, port, out)`` as ranks 0 and 1; return what rank 0 saved to ``out``."""
    out = str(tmp_path / "rank0.pt")
    mp.start_processes(worker, args=(free_port(), out), nprocs=2, start_method="spawn")
    return torch.load(out)
