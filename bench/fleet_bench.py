"""A fleet of N workers behind the router against one worker alone, on the same workload (issue
23's acceptance 6: two workers, one per GPU, at >= 1.8x one worker's output tok/s).

    python bench/fleet_bench.py --shape llama8b --workers 2                       # SGLang's offline CI workload
    python bench/fleet_bench.py --shape llama8b --workers 2 --request-rate 4      # arrivals at a rate
    python bench/fleet_bench.py --model-path /models/Llama-3.1-8B-Instruct --workers 2

The workload is ``serve_bench.py``'s (``common.random_workload``, seed 1: 500 prompts, inputs 1-4096
and outputs 1-2048 tokens of random ids, ``ignore_eos``, greedy, all at once by default), streamed
to ``/generate``. First one ``treadle serve`` on GPU 0, then ``treadle fleet up`` with worker i on
GPU i (``CUDA_VISIBLE_DEVICES``) and the cache-aware router in front, stopped with ``fleet down``.
The result lines are ``one_worker``, ``fleet`` and ``speedup`` (fleet / one worker output tok/s).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from common import CONFIGS, ROOT, Results, bench_parser, config_model_dir, engine_kwargs, random_workload, smollm2_tokenizer_dir
from serve_bench import SHAPES, figures, over_http, prompt_vocab, start_server, stop_server


def fleet_spec(path: str, model_dir: str, kwargs: dict, workers: int, port: int) -> None:
    engine = {"model_path": model_dir, **kwargs}
    lines = [f'name = "bench"', 'state_dir = "state"', "[engine]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in engine.items()]
    lines += ["[router]", f"port = {port}", "[supervisor]", "start_timeout_s = 900.0",
              "deep_health_interval_s = 60.0", "deep_health_timeout_s = 120.0"]
    for i in range(workers):
        lines += ["[[workers]]", f'name = "w{i}"', f"gpus = [{i}]"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def run_fleet(spec: str, url: str, ins: list, outs: list, rate: float, workers: int) -> tuple[list, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log = open(os.path.join(os.path.dirname(spec), "supervisor.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "treadle.deploy", "up", spec], stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    status = os.path.join(os.path.dirname(spec), "state", "status.json")
    try:
        deadline = time.monotonic() + 1200
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the fleet did not come up; see {log.name}")
            try:
                with open(status) as f:
                    if sum(w["state"] == "healthy" for w in json.load(f)["workers"]) == workers:
                        break
            except (OSError, json.JSONDecodeError, KeyError):
                pass
            time.sleep(1)
        return asyncio.run(over_http(url, ins, outs, rate))
    finally:
        subprocess.run([sys.executable, "-m", "treadle.deploy", "down", spec], env=env, timeout=300)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    p = bench_parser(__doc__, tokenizer=True)
    p.add_argument("--shape", choices=sorted(SHAPES), help="a config-only shape with dummy weights")
    p.add_argument("--model-path", default="", help="a real model instead of --shape")
    p.add_argument("--workers", type=int, default=2, help="workers in the fleet, one GPU each")
    p.add_argument("--num-prompts", type=int, default=500)
    p.add_argument("--request-rate", type=float, default=float("inf"))
    p.add_argument("--input-range", default="1,4096")
    p.add_argument("--output-range", default="1,2048")
    p.add_argument("--port", type=int, default=30123)
    p.add_argument("--skip-single", action="store_true", help="the fleet only")
    a = p.parse_args()
    kwargs = engine_kwargs(a)
    tmp = tempfile.mkdtemp(prefix="treadle-fleet-bench-")
    model_dir = a.model_path
    if not model_dir:
        if not a.shape:
            p.error("give --shape or --model-path")
        model_dir = config_model_dir(os.path.join(CONFIGS, SHAPES[a.shape], "config.json"),
                                     a.tokenizer_dir or smollm2_tokenizer_dir(), "treadle-fleet-bench-model-")
        kwargs = {"load_format": "dummy", "random_seed": 0, **kwargs}
    ins, outs = random_workload(a.num_prompts, tuple(int(x) for x in a.input_range.split(",")),
                                tuple(int(x) for x in a.output_range.split(",")), seed=1, vocab=prompt_vocab(model_dir))
    res = Results("fleet_bench", a.out, kwargs, shape=a.shape or a.model_path, prompts=a.num_prompts,
                  request_rate=str(a.request_rate), workers=a.workers)
    try:
        single = None
        if not a.skip_single:
            os.environ["CUDA_VISIBLE_DEVICES"] = "0"
            proc = start_server(model_dir, kwargs, a.port, os.path.join(tmp, "one_worker.log"))
            os.environ.pop("CUDA_VISIBLE_DEVICES")
            try:
                done, seconds = asyncio.run(over_http(f"http://127.0.0.1:{a.port}", ins, outs, a.request_rate))
            finally:
                stop_server(proc)
            single = figures(done, seconds)
            res.record("one_worker", **single)
        spec = os.path.join(tmp, "fleet.toml")
        fleet_spec(spec, model_dir, kwargs, a.workers, a.port)
        done, seconds = run_fleet(spec, f"http://127.0.0.1:{a.port}", ins, outs, a.request_rate, a.workers)
        fleet = figures(done, seconds)
        res.record("fleet", **fleet)
        if single and single["output_tok_s"]:
            res.record("speedup", fleet_over_one_worker=round(fleet["output_tok_s"] / single["output_tok_s"], 3))
    finally:
        if model_dir != a.model_path:
            shutil.rmtree(model_dir, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
