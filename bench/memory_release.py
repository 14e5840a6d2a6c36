"""``release_memory_occupation`` / ``resume_memory_occupation`` on a GPU (issue 26, acceptance 3).

    python bench/memory_release.py --shape llama8b [--cycles 20] [--out FILE]

For each tag set (weights, kv_cache, both): the device memory the driver sees as free
(``torch.cuda.mem_get_info``, read in this process: the worker shares the card) before and after
release, against the weights + KV bytes the worker reports; ``--cycles`` release/resume cycles
with greedy outputs compared to the first; the time a resume takes (it captures the CUDA graphs
again); and batch-1 decode speed before the first release and after the last resume (graphs
intact: the speed must not drop to eager decoding's).
"""

from __future__ import annotations

import random
import time

import torch

from common import CONFIGS, Results, bench_parser, config_model_dir, engine_kwargs, smollm2_tokenizer_dir, worker_startup_info

SHAPES = {"smollm2": "smollm2-135m", "llama8b": "llama-3.1-8b"}
TAG_SETS = (["weights"], ["kv_cache"], None)


def free_bytes() -> int:
    """What the driver reports free on the card (0 without CUDA: a CPU smoke run)."""
    return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0


def batch1_tok_s(eng, vocab: int, new_tokens: int) -> float:
    prompt = [random.Random(2).randrange(100, vocab) for _ in range(32)]
    best = 0.0
    for i in range(3):
        t = time.perf_counter()
        r = eng.generate(input_ids=prompt[:-1] + [100 + i],
                         sampling_params={"temperature": 0, "ignore_eos": True, "max_new_tokens": new_tokens})
        best = max(best, len(r["output_ids"]) / (time.perf_counter() - t))
    return round(best, 1)


def main() -> None:
    p = bench_parser(__doc__, tokenizer=True)
    p.add_argument("--shape", default="llama8b", choices=sorted(SHAPES))
    p.add_argument("--cycles", type=int, default=20)
    p.add_argument("--decode-tokens", type=int, default=256, help="new tokens of each batch-1 run")
    a = p.parse_args()
    from treadle import Engine

    d = config_model_dir(str(CONFIGS / SHAPES[a.shape] / "config.json"), a.tokenizer_dir or smollm2_tokenizer_dir(),
                         "memrel-")
    kwargs = engine_kwargs(a)
    res = Results("memory_release", a.out, kwargs, shape=a.shape)
    eng = Engine(model_path=d, load_format="dummy", random_seed=0, log_level="warning", **kwargs)
    try:
        info = worker_startup_info(eng)
        vocab = int(info.get("vocab_size", 32000))
        held = int(info["weight_bytes"]) + int(info["kv_bytes"])
        prompts = [[random.Random(i).randrange(100, vocab) for _ in range(64)] for i in range(4)]
        greedy = {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True}

        def outputs() -> list[list[int]]:
            """Computed from scratch each time: a prefix-cache hit takes other kernels (another bf16 rounding)."""
            eng.flush_cache()
            return [r["output_ids"] for r in eng.generate(input_ids=prompts, sampling_params=greedy)]

        want = outputs()
        speed_before = batch1_tok_s(eng, vocab, a.decode_tokens)
        res.record("held", weight_bytes=int(info["weight_bytes"]), kv_bytes=int(info["kv_bytes"]),
                   graph_capture_s=round(info.get("cuda_graph_capture_time", 0), 2), batch1_tok_s=speed_before)
        for tags in TAG_SETS:
            expect = {"weights": int(info["weight_bytes"]), "kv_cache": int(info["kv_bytes"])}
            expect = held if tags is None else sum(expect[t] for t in tags)
            free0 = free_bytes()
            eng.release_memory_occupation(tags)
            freed = free_bytes() - free0
            t = time.perf_counter()
            eng.resume_memory_occupation(tags)
            resume_s = time.perf_counter() - t
            same = outputs() == want
            cycles_t = time.perf_counter()
            for _ in range(a.cycles - 1):
                eng.release_memory_occupation(tags)
                eng.resume_memory_occupation(tags)
            cycle_s = (time.perf_counter() - cycles_t) / max(1, a.cycles - 1)
            res.record("cycle", tags=tags or "all", freed_bytes=freed, expected_bytes=expect,
                       freed_pct=round(100 * freed / expect, 2), resume_s=round(resume_s, 2),
                       cycle_s=round(cycle_s, 2), same_outputs_after_first=same,
                       same_outputs_after_all=outputs() == want)
        res.record("after", batch1_tok_s=batch1_tok_s(eng, vocab, a.decode_tokens), before=speed_before)
    finally:
        eng.shutdown()


if __name__ == "__main__":
    main()
