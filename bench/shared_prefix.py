"""Shared-prefix throughput: many requests over a few long system prompts, radix cache on and off.

    python bench/shared_prefix.py [--prompts 4] [--requests 64] [--prefix-words 300] [--new-tokens 16] [--out FILE]

The workload SGLang's prefix cache is built for: each request is one of a few long system
prompts plus a short question. Prints requests/s, output tok/s and the cache hit rate.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from common import Results, bench_parser, engine_kwargs


def workload(n_prompts: int, n_requests: int, words: int) -> list[str]:
    systems = [" ".join(f"Rule {p}.{i}: answer carefully and politely." for i in range(words // 6))
               for p in range(n_prompts)]
    return [f"{systems[i % n_prompts]}\nQuestion {i}: what is {i} plus {i}?" for i in range(n_requests)]


def run(prompts: list[str], new_tokens: int, disable_cache: bool, engine_args: dict[str, Any]) -> dict:
    from treadle import Engine

    params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
    with Engine(model_path="default", **{**engine_args, "disable_radix_cache": disable_cache}) as eng:
        eng.generate(prompt="warm up", sampling_params={"max_new_tokens": 4})

        async def go() -> list:
            return await asyncio.gather(*[eng.async_generate(prompt=p, sampling_params=params) for p in prompts])

        t0 = time.perf_counter()
        res = asyncio.run(go())
        dt = time.perf_counter() - t0
    prompt = sum(r["meta_info"]["prompt_tokens"] for r in res)
    cached = sum(r["meta_info"]["cached_tokens"] for r in res)
    out = sum(r["meta_info"]["completion_tokens"] for r in res)
    return {"req_s": len(res) / dt, "tok_s": out / dt, "hit": cached / prompt, "prompt_tokens": prompt / len(res)}


def main() -> None:
    p = bench_parser(__doc__)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prefix-words", type=int, default=300)
    p.add_argument("--new-tokens", type=int, default=16)
    a = p.parse_args()
    prompts = workload(a.prompts, a.requests, a.prefix_words)
    res = Results("shared_prefix", a.out, engine_kwargs(a), echo=False, prompts=a.prompts, requests=a.requests,
                  prefix_words=a.prefix_words, new_tokens=a.new_tokens)
    print("| radix cache | requests/s | output tok/s | cache hit rate | mean prompt tokens |")
    print("|---|---|---|---|---|")
    for disable in (False, True):
        r = run(prompts, a.new_tokens, disable, engine_kwargs(a))
        print(f"| {'off' if disable else 'on'} | {r['req_s']:.2f} | {r['tok_s']:.1f} | {r['hit']:.1%} | "
              f"{r['prompt_tokens']:.0f} |", flush=True)
        res.record(f"radix_cache_{'off' if disable else 'on'}", **{k: round(v, 4) for k, v in r.items()})


if __name__ == "__main__":
    main()
