"""The worker's decode step alone under different OpenMP wait settings (issue 28, docs/perf.md).

    python bench/tools/omp_wait_probe.py [--reps 8] [--env OMP_WAIT_POLICY=PASSIVE] [--env GOMP_SPINCOUNT=3000]...

Each setting runs in a fresh interpreter (libgomp reads its variables when torch loads): a
``ModelRunner`` on the default model (float32, torch's default threads) prefills 12 tokens and
decodes 16, ``--reps`` times; printed are the best and median wall milliseconds per token and the
median CPU milliseconds per token (all threads). The best of several reps approximates a quiet
machine when other jobs load this one; the median, what the load does. No setting: libgomp's
default spin.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def probe(reps: int) -> str:
    sys.path.insert(0, str(ROOT / "bench"))
    from common import model_files_dir

    from treadle.gpu_worker.model_runner import ModelRunner, RunnerConfig
    from treadle.runtime.messages import ForwardPlan, NewSlot, PlanRow, SamplingSpec

    r = ModelRunner(RunnerConfig(model_dir=model_files_dir(), device="cpu", dtype="float32", kv_tokens=4096,
                                 max_slots=4, context_len=2048))

    def run(n: int) -> tuple[float, float]:
        plan = ForwardPlan(step=0, new_slots=[NewSlot(0, SamplingSpec(temperature=0.0))],
                           rows=[PlanRow(0, list(range(100, 112)), 0, list(range(12)))])
        ids, _ = r.forward(plan)
        t0, c0 = time.perf_counter(), time.process_time()
        for s in range(n):
            ids, _ = r.forward(ForwardPlan(step=s + 1, rows=[PlanRow(0, [ids[0]], 12 + s, [12 + s])]))
        return (time.perf_counter() - t0) / n * 1000, (time.process_time() - c0) / n * 1000

    run(4)
    res = [run(16) for _ in range(reps)]
    walls, cpus = [w for w, _ in res], [c for _, c in res]
    return f"best {min(walls):.1f} / median {statistics.median(walls):.1f} ms wall, {statistics.median(cpus):.1f} ms CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--env", action="append", default=[], help="VAR=VALUE: one setting per flag (none: the default)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(probe(a.reps), flush=True)
        return
    for setting in a.env or [""]:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        env.pop("OMP_WAIT_POLICY", None), env.pop("GOMP_SPINCOUNT", None)
        if setting:
            k, v = setting.split("=", 1)
            env[k] = v
        out = subprocess.run([sys.executable, __file__, "--child", "--reps", str(a.reps)], env=env,
                             capture_output=True, text=True)
        line = out.stdout.strip().splitlines()[-1] if out.returncode == 0 else out.stderr[-500:]
        print(f"{setting or 'default spin'}: {line}", flush=True)


if __name__ == "__main__":
    main()
