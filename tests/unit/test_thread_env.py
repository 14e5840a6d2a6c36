"""The OpenMP/BLAS settings each child process starts with (``runtime/procs.thread_env``): one
thread for the light processes, a short spin for a CPU worker (docs/perf.md, CPU section), the
cores split among the local worker ranks, and what the user set for the worker kept."""

from __future__ import annotations

import subprocess
import sys

from treadle.runtime.procs import LIGHT_THREAD_ENV, thread_env

CPU = {"device": "cpu", "tp_size": 1, "pp_size": 1, "dp_size": 1, "nnodes": 1}
WORKER = "treadle.gpu_worker.main"


def test_light_processes_get_one_thread_whatever_the_device():
    for module in ("treadle.tokenizer_proc.main", "treadle.detokenizer_proc.main", "treadle.scheduler_proc.main"):
        assert thread_env(module, CPU, {}) == LIGHT_THREAD_ENV
        assert thread_env(module, {**CPU, "device": "cuda"}, {"OMP_NUM_THREADS": "8"})["OMP_NUM_THREADS"] == "1"


def test_cpu_worker_spins_briefly_and_shares_the_cores_among_local_ranks():
    assert thread_env(WORKER, CPU, {}, cores=2) == {"GOMP_SPINCOUNT": "1000"}  # one rank: torch's thread default
    assert thread_env(WORKER, {**CPU, "tp_size": 2}, {}, cores=2) == {"GOMP_SPINCOUNT": "1000", "OMP_NUM_THREADS": "1"}
    assert thread_env(WORKER, {**CPU, "tp_size": 2, "pp_size": 2}, {}, cores=16)["OMP_NUM_THREADS"] == "4"
    assert thread_env(WORKER, {**CPU, "tp_size": 4, "nnodes": 2}, {}, cores=8)["OMP_NUM_THREADS"] == "4"
    assert thread_env(WORKER, {**CPU, "tp_size": 4}, {}, cores=2)["OMP_NUM_THREADS"] == "1"


def test_cuda_worker_and_user_settings_are_left_alone():
    assert thread_env(WORKER, {**CPU, "device": "cuda"}, {}) == {}
    assert thread_env(WORKER, CPU, {"OMP_WAIT_POLICY": "ACTIVE"}) == {}
    assert thread_env(WORKER, CPU, {"GOMP_SPINCOUNT": "10000"}) == {}
    assert thread_env(WORKER, {**CPU, "tp_size": 2}, {"OMP_NUM_THREADS": "2"}, cores=2) == {"GOMP_SPINCOUNT": "1000"}


def test_the_settings_reach_openmp_when_set_before_torch_loads():
    """What ``run_child`` relies on: the variables, set in ``os.environ`` before torch is imported,
    are what the OpenMP runtime reads (torch's thread count follows OMP_NUM_THREADS)."""
    code = ("import os; os.environ.update({'OMP_NUM_THREADS': '1', 'GOMP_SPINCOUNT': '1000'}); "
            "import torch; print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "1", out.stderr[-2000:]
