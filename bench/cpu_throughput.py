"""CPU throughput: Treadle's output tok/s at 1 and 32 concurrent requests beside HF ``generate``.

    python bench/cpu_throughput.py [--new-tokens 64] [--batch 32] [--skip-hf] [--engine-args JSON] [--out FILE]

Same weights (the default SmolLM2-135M-Instruct, float32), same prompts, greedy, every request
runs exactly ``--new-tokens`` tokens (ignore_eos / min_new_tokens). Prints one table row each.
"""

from __future__ import annotations

import asyncio
import time

from common import Results, bench_parser, engine_kwargs, model_files_dir

PROMPT = "Write a short story about a robot who learns to paint. Request number {i}."


def bench_treadle(n_req: int, new_tokens: int, engine_args: dict) -> float:
    from treadle import Engine

    params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
    with Engine(model_path="default", **engine_args) as eng:
        eng.generate(prompt="warm up", sampling_params={"max_new_tokens": 4})

        async def run() -> list:
            return await asyncio.gather(*[eng.async_generate(prompt=PROMPT.format(i=i), sampling_params=params)
                                          for i in range(n_req)])

        t0 = time.perf_counter()
        res = asyncio.run(run())
        dt = time.perf_counter() - t0
    return sum(r["meta_info"]["completion_tokens"] for r in res) / dt


def bench_hf(n_req: int, new_tokens: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = model_files_dir()
    tok = AutoTokenizer.from_pretrained(d)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    enc = tok([PROMPT.format(i=i) for i in range(n_req)], return_tensors="pt", padding=True)
    with torch.no_grad():
        model.generate(**tok(["warm up"], return_tensors="pt"), max_new_tokens=4, do_sample=False)
        t0 = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        dt = time.perf_counter() - t0
    return (out.shape[1] - enc["input_ids"].shape[1]) * n_req / dt


def main() -> None:
    p = bench_parser(__doc__, hf=True)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    a = p.parse_args()
    res = Results("cpu_throughput", a.out, engine_kwargs(a), echo=False, new_tokens=a.new_tokens)
    print("| concurrent requests | Treadle tok/s | HF generate tok/s |")
    print("|---|---|---|")
    for n in (1, a.batch):
        hf = None if a.skip_hf else bench_hf(n, a.new_tokens)
        ours = bench_treadle(n, a.new_tokens, engine_kwargs(a))
        print(f"| {n} | {ours:.1f} | {'-' if hf is None else f'{hf:.1f}'} |", flush=True)
        res.record(f"concurrent_{n}", treadle_tok_s=round(ours, 1), hf_tok_s=None if hf is None else round(hf, 1))


if __name__ == "__main__":
    main()
