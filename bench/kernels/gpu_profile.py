"""Where a decode step's GPU time goes: per-kernel totals of ``ModelRunner`` decode steps.

    python bench/kernels/gpu_profile.py --config bench/configs/llama-3.1-8b/config.json [--batch 1 --batch 64] [--context 1024]
        [--tp 2 [--fusion]] [--kv-cache-dtype fp8_e4m3]

Builds the runner in-process (dummy bf16 weights, Triton attention, CUDA graphs), prefills
``batch`` requests of ``context`` tokens, then times 50 decode steps (wall per step, graphs on and
off) and profiles 20 of them with the torch profiler; prints the top kernels by total CUDA time
and the share of the step the GEMMs take. No engine, no processes: the model's own cost only. On
Hopper the decode kernels are launched with PDL and overlap, so their summed time exceeds the step;
run with ``TREADLE_DISABLE_PDL=1`` for a per-kernel breakdown (of the slower, plain-launch step).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile
import time

import torch

from treadle.gpu_worker.layers.pdl import pdl_supported
from treadle.gpu_worker.model_runner import ModelRunner, RunnerConfig
from treadle.runtime.messages import ForwardPlan, NewSlot, PlanRow, SamplingSpec


def run(config: str, batch: int, context: int, graphs: bool, device: str = "cuda", tp_rank: int = 0,
        tp_size: int = 1, fusion: bool = False, kv_cache_dtype: str = "auto") -> None:
    d = tempfile.mkdtemp(prefix="treadle-prof-")
    shutil.copy(config, os.path.join(d, "config.json"))
    if tp_size > 1:
        device = f"{device}:{tp_rank}" if device == "cuda" else device
    runner = ModelRunner(RunnerConfig(model_dir=d, load_format="dummy", dtype="bfloat16" if device.startswith("cuda") else "float32", device=device,
                                      kv_tokens=batch * (context + 200), max_slots=batch, context_len=context + 200,
                                      attention_backend="triton" if device.startswith("cuda") else "torch_native",
                                      cuda_graph_max_bs=batch if graphs else 0, tp_rank=tp_rank, tp_size=tp_size,
                                      custom_all_reduce=tp_size > 1, allreduce_fusion=fusion,
                                      kv_cache_dtype=kv_cache_dtype))
    device, pdl_on = runner.device.type, pdl_supported(runner.device)
    say = print if tp_rank == 0 else (lambda *a, **k: None)
    greedy = SamplingSpec(temperature=0.0, top_k=1)
    loc = 0
    per_prefill = max(1, 16384 // context)  # prefill a few rows at a time: the MLP of 128k tokens won't fit
    for first in range(0, batch, per_prefill):
        rows = []
        for i in range(first, min(batch, first + per_prefill)):
            rows.append(PlanRow(i, [(7 * i + j) % 1000 + 1 for j in range(context)], 0, list(range(loc, loc + context))))
            loc += context
        runner.forward(ForwardPlan(step=0, new_slots=[NewSlot(r.slot, greedy) for r in rows], rows=rows))
    pos = context

    def step(k: int) -> None:
        nonlocal loc, pos
        plan = ForwardPlan(step=k, rows=[PlanRow(i, [-1], pos, [loc + i]) for i in range(batch)])
        loc, pos = loc + batch, pos + 1
        runner.finish(runner.launch(plan))

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for k in range(5):
        step(1 + k)
    sync()
    t = time.perf_counter()
    for k in range(50):
        step(10 + k)
    sync()
    per_step = (time.perf_counter() - t) / 50
    say(f"tp {tp_size}{' fused' if fusion else ''}, KV {runner.kv_dtype}, batch {batch}, context {context}, "
        f"graphs {graphs}: {1000 * per_step:.3f} ms a step ({batch / per_step:.0f} tok/s, model only)", flush=True)
    if graphs and device == "cuda":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for k in range(20):
                step(100 + k)
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        total = sum(e.self_device_time_total for e in events)
        if pdl_on:  # kernels launched early sit on the GPU while they wait
            say("  (PDL on: kernel times overlap and include waiting; TREADLE_DISABLE_PDL=1 for a breakdown)")
        say(f"  kernel time {total / 20 / 1000:.3f} ms a step; top kernels (share, us a step, calls a step):")
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:14]:
            say(f"  {100 * e.self_device_time_total / total:5.1f}%  {e.self_device_time_total / 20:8.1f}  "
                  f"{e.count / 20:5.1f}  {e.key[:90]}")
    del runner
    if device == "cuda":
        torch.cuda.empty_cache()
    shutil.rmtree(d, ignore_errors=True)


def drop_communication(tp_size: int) -> None:
    """Replace every TP collective of the forward by its local part (wrong sums, right shapes): the
    step time left is the cost of the ranks' own kernels, so the difference is the communication's."""
    from treadle.gpu_worker.layers import embedding, linear, norm

    os.environ["TREADLE_DISABLE_GEMV_PUSH"] = "1"
    norm.fused_all_reduce_rms_norm = lambda *args: None  # the norm then calls all_reduce, which is:
    norm.all_reduce = embedding.all_reduce = linear.all_reduce = lambda x: x
    embedding.all_gather_last_dim = lambda x: torch.cat([x] * tp_size, dim=-1)


def run_rank(rank: int, a: argparse.Namespace, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if a.no_comm:
        drop_communication(a.tp)
    for b in a.batch or [1]:
        run(a.config, b, a.context, True, a.device, rank, a.tp, a.fusion, a.kv_cache_dtype)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--batch", type=int, action="append")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--device", default="cuda")
    p.add_argument("--graphs-only", action="store_true", help="skip the eager comparison")
    p.add_argument("--tp", type=int, default=1, help="profile rank 0 of this many TP ranks (graphs only)")
    p.add_argument("--fusion", action="store_true", help="with --tp: all-reduce fused into the RMSNorms")
    p.add_argument("--kv-cache-dtype", default="auto", help="e.g. fp8_e4m3")
    p.add_argument("--no-comm", action="store_true", help="with --tp: time the step without its collectives")
    a = p.parse_args()
    if a.tp > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.multiprocessing.start_processes(run_rank, args=(a, port), nprocs=a.tp, start_method="spawn")
        return
    for b in a.batch or [1]:
        for graphs in (True,) if a.graphs_only else (True, False):
            run(a.config, b, a.context, graphs, a.device, kv_cache_dtype=a.kv_cache_dtype)


if __name__ == "__main__":
    main()
