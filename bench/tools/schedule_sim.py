"""The real scheduler on an offline workload, against a cost model of the GPU: where would the time go?

    python bench/tools/schedule_sim.py [--prompts 200] [--kv-tokens 423330] [--max-running 256] [--chunk 8192]

Drives ``Scheduler`` (no processes, no model) with SGLang's CI workload (inputs uniform in
[1, 4096], outputs in [1, 2048], ignore_eos; the same prompts as ``bench/gpu_bench.py`` part b,
both drawn by ``bench/common.py``), two steps in flight as with overlap scheduling, and prices
every planned step with a model of Llama-3.1-8B bf16 on one H100, fitted to
``bench/kernels/gpu_profile.py`` (2026-11-25):

- weights: 5.6 ms a step (15 GB at about 2.7 TB/s), or the GEMM FLOPs at 650 TFLOP/s if more;
- decode attention: the K/V bytes each row reads (131 kB a token) at 2.8 TB/s;
- prefill attention: its FLOPs at 350 TFLOP/s (the extend kernel);
- 0.4 ms a step of small kernels (norms, RoPE, sampling).

(Profile at batch 64, context 2048: 12.4 ms of GPU time a step; this model: 12.1 ms.) It prints
the modelled time and output tok/s, the step mix, and how much of the time is spent with few
rows running (the tail, where the weights are read for few tokens). Compare the modelled total
with a measured run to see whether a gap is in the schedule or in the execution.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/, for common.py

from common import random_workload  # noqa: E402

from treadle.runtime.messages import PLACEHOLDER, TokenizedReq, WorkerInfo  # noqa: E402
from treadle.runtime.sampling_params import SamplingParams  # noqa: E402
from treadle.runtime.server_args import ServerArgs  # noqa: E402
from treadle.scheduler_proc.scheduler import Scheduler  # noqa: E402

KV_BYTES_PER_TOKEN = 32 * 8 * 128 * 2 * 2  # layers * KV heads * head dim * (K, V) * bf16
FLOPS_PER_TOKEN = 2 * 8.0e9
WEIGHTS_S, SMALL_S = 5.6e-3, 0.4e-3
HBM, GEMM_FLOPS, ATTN_FLOPS = 2.8e12, 650e12, 350e12


def step_cost(rows: list, kv_bytes_per_token: int = KV_BYTES_PER_TOKEN) -> tuple[float, bool]:
    """Modelled seconds of one step, and whether it carried prefill tokens."""
    tokens = sum(len(r.input_ids) for r in rows)
    attn_bytes = attn_flops = 0.0
    prefill = False
    for r in rows:
        n = len(r.input_ids)
        if n == 1 and r.input_ids[0] == PLACEHOLDER or (n == 1 and r.start_pos > 0):
            attn_bytes += (r.start_pos + 1) * kv_bytes_per_token
        else:
            prefill = True
            attn_flops += 4 * n * (r.start_pos + n / 2) * 4096 * 32
    return max(WEIGHTS_S, tokens * FLOPS_PER_TOKEN / GEMM_FLOPS) + attn_bytes / HBM + attn_flops / ATTN_FLOPS + SMALL_S, prefill


class Tok:
    def decode(self, ids, skip_special_tokens=False):
        return ""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--kv-tokens", type=int, default=423330, help="the pool the 8B engine got on an H100")
    p.add_argument("--max-running", type=int, default=256)
    p.add_argument("--chunk", type=int, default=8192)
    p.add_argument("--max-prefill-tokens", type=int, default=16384)
    p.add_argument("--policy", default="fcfs")
    p.add_argument("--fp8-kv", action="store_true", help="1-byte K/V: half the attention reads (give --kv-tokens 2x)")
    a = p.parse_args()
    args = ServerArgs(model_path="sim", device="cpu", random_seed=0, page_size=1, chunked_prefill_size=a.chunk,
                      max_prefill_tokens=a.max_prefill_tokens, schedule_policy=a.policy, disable_radix_cache=True,
                      stream_interval=10**6).resolved()
    s = Scheduler(args, Tok(), {0}, WorkerInfo(context_len=8192, kv_tokens=a.kv_tokens, max_slots=a.max_running, vocab_size=1 << 62))
    ins, outs = random_workload(a.prompts, (1, 4096), (1, 2048), seed=1, vocab=128256)
    s.add_requests([TokenizedReq(rid=str(i), input_ids=x, stream=False,
                                 sampling=SamplingParams(max_new_tokens=o, ignore_eos=True, temperature=0.0))
                    for i, (x, o) in enumerate(zip(ins, outs))])
    total = 0.0
    by_kind: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0])
    tail_s = 0.0
    inflight: collections.deque = collections.deque()
    done = 0
    while done < a.prompts:
        plan = s.schedule() if len(inflight) < 2 else None
        if plan is not None:
            cost, prefill = step_cost(plan.rows, KV_BYTES_PER_TOKEN // (2 if a.fp8_kv else 1))
            total += cost
            k = by_kind["prefill+decode" if prefill else "decode"]
            k[0], k[1], k[2] = k[0] + 1, k[1] + cost, k[2] + len(plan.rows)
            if len(plan.rows) < 32:
                tail_s += cost
            inflight.append([5] * sum(r.sample for r in plan.rows))
        if inflight and (plan is None or len(inflight) >= 2):
            s.apply_result(inflight.popleft())
        done += sum(1 for o in s.take_outputs() if o.finish is not None)
        s.take_errors()
    gen = sum(outs)
    print(f"{a.prompts} prompts, {gen} output tokens, kv {a.kv_tokens}, max running {a.max_running}, chunk {a.chunk}: "
          f"modelled {total:.1f} s, {gen / total:.0f} tok/s; retractions {s.stats.get('retractions', 0)}")
    for kind, (n, sec, rows) in by_kind.items():
        print(f"  {kind:15s} {n:6d} steps  {sec:6.1f} s  {rows / max(n, 1):6.1f} rows a step")
    print(f"  steps with under 32 rows: {tail_s:.1f} s")


if __name__ == "__main__":
    main()
