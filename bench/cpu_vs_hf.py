"""CPU cost per generated token at batch 1: the Engine (all its processes) beside HF ``generate``.

    python bench/cpu_vs_hf.py [--new-tokens 64] [--rounds 3] [--child-env JSON]... [--hf-omp-passive]

Issue 28, acceptance 4: on the CPU, default model (SmolLM2-135M-Instruct, the packaged GGUF
dequantized to float32), one request, greedy, exactly ``--new-tokens`` new tokens. HF
transformers ``generate`` runs on the same weights (``model_files_dir()``, the directory the
engine loads) and the same prompt ids, in this process. The engine's CPU-seconds are those of
every process it runs: this (client) process plus all its descendants (tokenizer, detokenizer,
scheduler, worker, the socket-directory janitor and what they reaped), read with psutil before
and after the call. HF's are this process's alone (``time.process_time``: every thread), with
torch's default OpenMP settings (``--hf-omp-passive``: the passive wait the engine's worker
uses). The sides alternate for ``--rounds`` rounds, so load from other jobs on the machine falls
on all of them; both CPU-seconds and wall time are printed, with medians and ratios at the end.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any

import psutil

from common import Results, bench_parser, engine_kwargs, model_files_dir

PROMPT = "Write a short story about a robot who learns to paint."


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """User + system CPU time of ``procs``, including children they reaped (the janitor's sleeps)."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def descendants() -> set[int]:
    return {c.pid for c in psutil.Process().children(recursive=True)}


def proc_name(p: psutil.Process) -> str:
    """``client`` for this process, else the package a child runs (``gpu_worker``, ``scheduler_proc``...)."""
    if p.pid == psutil.Process().pid:
        return "client"
    try:
        cmd = p.cmdline()
    except psutil.NoSuchProcess:
        return "gone"
    mod = next((c for c in cmd if c.startswith("treadle.")), "")
    return mod.split(".", 1)[1] if mod else "other"


class EngineSide:
    """One engine, started with ``env`` added to its processes' environment, and the processes it
    runs (the descendants that appeared while it started) plus this client process."""

    def __init__(self, label: str, env: dict[str, str], engine_args: dict[str, Any]) -> None:
        from treadle import Engine

        self.label, saved, before = label, dict(os.environ), descendants()
        os.environ.update(env)
        try:
            self.eng = Engine(model_path="default", **engine_args)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self.procs = [psutil.Process(), *(psutil.Process(pid) for pid in descendants() - before)]
        self.split: dict[str, float] = {}

    def measure(self, ids: list[int], new_tokens: int) -> tuple[float, float, int]:
        """(CPU-seconds of every engine process, wall seconds, tokens) for one greedy call; adds
        each process's share to ``split``."""
        params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
        before = [cpu_seconds([p]) for p in self.procs]
        t0 = time.perf_counter()
        out = self.eng.generate(input_ids=ids, sampling_params=params)
        wall = time.perf_counter() - t0
        used = [cpu_seconds([p]) - b for p, b in zip(self.procs, before)]
        for p, u in zip(self.procs, used):
            self.split[proc_name(p)] = self.split.get(proc_name(p), 0.0) + u
        return sum(used), wall, len(out["output_ids"])


def measure_hf(model: Any, ids: list[int], new_tokens: int) -> tuple[float, float, int]:
    """(CPU-seconds of this process, wall seconds, tokens) for HF's greedy ``generate``."""
    import torch

    x = torch.tensor([ids])
    c0, t0 = time.process_time(), time.perf_counter()
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return time.process_time() - c0, time.perf_counter() - t0, out.shape[1] - x.shape[1]


def main() -> None:
    p = bench_parser(__doc__, hf=False)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child-env", action="append", default=[],
                   help="JSON of environment variables for one more engine's processes (e.g. OpenMP's); "
                        "each flag adds an engine to the rounds, beside the plain one")
    p.add_argument("--hf-omp-passive", action="store_true",
                   help="OMP_WAIT_POLICY=PASSIVE for HF too (set before torch loads; the engines inherit it)")
    a = p.parse_args()
    if a.hf_omp_passive:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    import torch  # reads this process's OpenMP settings now: --child-env reaches the engines only
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = model_files_dir()
    ids = AutoTokenizer.from_pretrained(d)(PROMPT)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    res = Results("cpu_vs_hf", a.out, engine_kwargs(a), echo=False, new_tokens=a.new_tokens, prompt_tokens=len(ids),
                  hf_omp_passive=a.hf_omp_passive)
    envs = [{}] + [json.loads(e) for e in a.child_env]
    sides = [EngineSide("treadle" + (f" {json.dumps(e)}" if e else ""), e, engine_kwargs(a)) for e in envs]
    rows: dict[str, list[tuple[float, float, int]]] = {"hf": [], **{s.label: [] for s in sides}}
    try:
        measure_hf(model, ids, 8)  # warm up every side
        for s in sides:
            s.measure(ids, 8)
            s.split.clear()
        print("| round | side | CPU-s / token | tok/s | CPU-s | wall s |")
        print("|---|---|---|---|---|---|")
        for r in range(a.rounds):
            for label in rows:
                side = next((s for s in sides if s.label == label), None)
                cpu, wall, n = side.measure(ids, a.new_tokens) if side else measure_hf(model, ids, a.new_tokens)
                rows[label].append((cpu, wall, n))
                print(f"| {r + 1} | {label} | {cpu / n:.3f} | {n / wall:.1f} | {cpu:.2f} | {wall:.2f} |", flush=True)
    finally:
        for s in sides:
            s.eng.shutdown()
    summary = {}
    for label, runs in rows.items():
        summary[label] = {"cpu_s_per_token": round(statistics.median(c / n for c, _, n in runs), 4),
                          "tok_s": round(statistics.median(n / w for _, w, n in runs), 2),
                          # the least loaded round of each side: the nearest to a quiet machine
                          "best_cpu_s_per_token": round(min(c / n for c, _, n in runs), 4),
                          "best_tok_s": round(max(n / w for _, w, n in runs), 2),
                          "runs": [[round(c, 2), round(w, 2), n] for c, w, n in runs]}
        res.record(label, **summary[label])
    hf = summary["hf"]
    print(f"medians over {a.rounds} rounds (targets: CPU-s/token <= 1.2x HF's, tok/s >= HF's); load average "
          + " ".join(f"{x:.1f}" for x in psutil.getloadavg()))
    for s in sides:
        ratio = summary[s.label]["cpu_s_per_token"] / hf["cpu_s_per_token"]
        speed = summary[s.label]["tok_s"] / hf["tok_s"]
        best = summary[s.label]["best_tok_s"] / hf["best_tok_s"]
        print(f"  {s.label}: CPU-s/token {ratio:.2f}x HF's, tok/s {speed:.2f}x HF's (best rounds: {best:.2f}x); "
              "CPU-s by process: "
              + ", ".join(f"{k} {v:.2f}" for k, v in sorted(s.split.items(), key=lambda kv: -kv[1])))
        res.record(f"ratio {s.label}", cpu_per_token=round(ratio, 3), tok_s=round(speed, 3), best_tok_s=round(best, 3),
                   split={k: round(v, 2) for k, v in s.split.items()})


if __name__ == "__main__":
    main()
