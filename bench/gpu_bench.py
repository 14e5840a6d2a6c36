"""GPU benchmarks of issue #6, all in one process run (one device call), with HF transformers on
the same card as the baseline.

    python bench/gpu_bench.py --shape smollm2 --shape llama8b [--tokenizer-dir DIR] [--out FILE]

Shapes are random (``load_format="dummy"``) models built from a config: SmolLM2-135M,
Llama-3.1-8B, Gemma-3-12B, Qwen3-8B and the mixture-of-experts Qwen3-30B-A3B (bench/configs/;
``--shape gemma3_12b``, ``--shape qwen3_8b``, ``--shape qwen3_30b_a3b``: 61 GB of bf16 weights, one
80 GB card; use ``--skip-hf``, transformers' eager expert loop is no baseline worth the minutes),
and Llama-3.1-70B (``--shape llama70b``, with ``--engine-args '{"quantization": "awq"}' --skip-hf``:
random 4-bit weights made packed on the GPU, docs/quantization.md).
Parts, per shape:
  (a) batch-1 decode: 32-token prompt, 512 new tokens, greedy, ignore_eos: output tok/s end to end
  (b) SGLang's CI offline workload: N prompts (500 by default), input lengths uniform in [1, 4096],
      output uniform in [1, 2048], ignore_eos, seed 1: output tok/s
  (c) nano-vllm's workload: 256 sequences, input and output uniform in [100, 1024]: output tok/s
  (d) time to first token at batch 1 with a 1,024-token prompt (median of 5, distinct prompts), and
      the first such prompt right after start-up (``first_ms``: the issue-28 warm-up's figure)
  (e) engine start-up to first token, and the CUDA-graph capture time the worker logged
  (hf) HF ``generate`` (bf16, eager): batch 1 decode, TTFT, and a left-padded batch of 32 prompts
Results print as they come and are appended as JSON lines to ``--out`` (``bench/common.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import time
from typing import Any

import torch

from common import (CONFIGS, Results, bench_parser, config_model_dir, engine_kwargs, random_workload,
                    smollm2_tokenizer_dir, worker_startup_info)

SHAPES = {"smollm2": "smollm2-135m", "llama8b": "llama-3.1-8b", "gemma3_12b": "gemma-3-12b",
          "qwen3_8b": "qwen3-8b", "qwen3_30b_a3b": "qwen3-30b-a3b",
          "llama70b": "llama-3.1-70b"}  # 70B: 4-bit only on one card (docs/quantization.md)


def bench_treadle(res: Results, d: str, a: argparse.Namespace, vocab: int) -> None:
    from treadle import Engine

    t0 = time.perf_counter()
    eng = Engine(model_path=d, load_format="dummy", random_seed=0, log_level="warning", **engine_kwargs(a))
    eng.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 1})
    startup = time.perf_counter() - t0
    info = worker_startup_info(eng)
    res.record("e_startup", seconds=round(startup, 2), graph_capture_s=round(info.get("cuda_graph_capture_time", 0), 2),
               graph_sizes=len(info.get("cuda_graph_bs", [])), load_s=round(info.get("load_time", 0), 2),
               weight_gb=round(info.get("weight_bytes", 0) / 1e9, 2), kv_gb=round(info.get("kv_bytes", 0) / 1e9, 2),
               kv_tokens=eng.get_server_info().get("max_total_tokens", 0),
               phases=info.get("startup_phases", {}))
    try:
        first_ms = None
        if "d" in a.parts:  # the first 1,024-token prompt after start-up (issue 28: within 2x of a warm one)
            t = time.perf_counter()
            eng.generate(input_ids=ttft_prompt(9, vocab), sampling_params={"max_new_tokens": 1})
            first_ms = 1000 * (time.perf_counter() - t)
        greedy = {"temperature": 0, "ignore_eos": True}
        prompt = [random.Random(2).randrange(100, vocab) for _ in range(32)]
        eng.generate(input_ids=prompt, sampling_params={**greedy, "max_new_tokens": 64})  # warm up
        bench_parts(eng, res, a, vocab, greedy, prompt, first_ms)
    finally:
        eng.shutdown()


def ttft_prompt(seed: int, vocab: int) -> list[int]:
    return [random.Random(seed).randrange(100, vocab) for _ in range(1024)]


def bench_parts(eng: Any, res: Results, a: argparse.Namespace, vocab: int, greedy: dict, prompt: list[int],
                first_ms: Any = None) -> None:
    if "a" in a.parts:
        rates = []
        for i in range(3):
            p = prompt[:-1] + [100 + i]
            t = time.perf_counter()
            r = eng.generate(input_ids=p, sampling_params={**greedy, "max_new_tokens": 512})
            rates.append(len(r["output_ids"]) / (time.perf_counter() - t))
        res.record("a_batch1_decode", tok_s=round(max(rates), 1), runs=[round(x, 1) for x in rates])
    if "d" in a.parts:
        ttfts = []
        for i in range(5):
            t = time.perf_counter()
            eng.generate(input_ids=ttft_prompt(10 + i, vocab), sampling_params={"max_new_tokens": 1})
            ttfts.append(time.perf_counter() - t)
        warm = 1000 * statistics.median(ttfts)
        first = {} if first_ms is None else {"first_ms": round(first_ms, 1), "first_over_warm": round(first_ms / warm, 2)}
        res.record("d_ttft_1024", ms=round(warm, 1), **first)
    for part, n, ir, orng in (("c_nanovllm", 256, (100, 1024), (100, 1024)),
                              ("b_sglang_ci", a.ci_prompts, (1, 4096), (1, 2048))):
        if part[0] not in a.parts:
            continue
        ins, outs = random_workload(n, ir, orng, seed=1, vocab=vocab)
        params = [{**greedy, "max_new_tokens": o} for o in outs]
        eng.flush_cache()
        before = eng.get_server_info()["internal_states"]
        if part == "b_sglang_ci" and a.profile_ci:  # a GPU trace of a window of steps, for trace_summary.py
            start, num = (int(x) for x in a.profile_ci.split(":"))
            eng.start_profile(output_dir=a.profile_dir, profile_prefix=f"{res.labels['shape']}-ci",
                              start_step=before[0]["step"] + start, num_steps=num, activities=["GPU"], with_stack=False)
        t = time.perf_counter()
        done = eng.generate(input_ids=ins, sampling_params=params)
        dt = time.perf_counter() - t
        after = eng.get_server_info()["internal_states"]
        gen = sum(len(r["output_ids"]) for r in done)
        retracted = sum(x["retractions"] for x in after) - sum(x["retractions"] for x in before)
        res.record(part, prompts=n, output_tokens=gen, seconds=round(dt, 1), tok_s=round(gen / dt, 1),
                   retractions=retracted, kv_tokens=after[0]["max_total_tokens"],
                   prefill_beside_decode=after[0]["max_prefill_tokens_beside_decode"])  # enable_pdmux bounds it


def bench_hf(res: Results, d: str, vocab: int) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(d)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()

    def gen(ids: list[list[int]], new: int) -> float:
        width = max(map(len, ids))
        x = torch.tensor([[0] * (width - len(p)) + p for p in ids], device="cuda")
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids], device="cuda")
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(x, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    prompt = [random.Random(2).randrange(100, vocab) for _ in range(32)]
    gen([prompt], 8)
    res.record("hf_a_batch1_decode", tok_s=round(128 / gen([prompt], 128), 1))
    with torch.inference_mode():
        p = torch.tensor([[random.Random(10).randrange(100, vocab) for _ in range(1024)]], device="cuda")
        ts = []
        for _ in range(3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            model(p)
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
    res.record("hf_d_ttft_1024", ms=round(1000 * statistics.median(ts), 1))
    ins, outs = random_workload(32, (100, 1024), (100, 1024), seed=1, vocab=vocab)
    new = 256
    dt = gen(ins, new)
    res.record("hf_batch32_padded", prompts=32, new_tokens_each=new, tok_s=round(32 * new / dt, 1))
    del model
    torch.cuda.empty_cache()


def main() -> None:
    p = bench_parser(__doc__, hf=True, tokenizer=True)
    p.add_argument("--shape", action="append", choices=sorted(SHAPES), required=True)
    p.add_argument("--ci-prompts", type=int, default=500)
    p.add_argument("--parts", default="abcde", help="which of the parts a-e to run (e always runs)")
    p.add_argument("--profile-ci", default="", metavar="START:N",
                   help="trace N steps of part b from its START-th step (see bench/tools/trace_summary.py)")
    p.add_argument("--profile-dir", default="/tmp/treadle-traces")
    a = p.parse_args()
    tokenizer_dir = a.tokenizer_dir or smollm2_tokenizer_dir()
    for shape in a.shape:
        d = config_model_dir(os.path.join(CONFIGS, SHAPES[shape], "config.json"), tokenizer_dir, f"treadle-{shape}-")
        vocab = json.load(open(os.path.join(d, "config.json")))["vocab_size"]
        res = Results("gpu_bench", a.out, engine_kwargs(a), shape=shape)
        bench_treadle(res, d, a, vocab)
        if not a.skip_hf:
            bench_hf(res, d, vocab)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
