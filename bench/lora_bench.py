"""What serving through LoRA adapters costs: output tok/s of the same batch on the base model and
through adapters (one for all requests, and a different one per request).

    python bench/lora_bench.py [--model default] [--requests 16] [--tokens 64] [--rank 8] [--device cpu] [--out FILE]

Adapters are made with peft (random A and B) on the model's own weights, targeting every
projection. ``load_format`` stays real so the adapters apply to the weights they were made for.
"""

from __future__ import annotations

import sys
import tempfile
import time

from common import ROOT, Results, bench_parser, engine_kwargs, model_files_dir

sys.path.insert(0, str(ROOT / "tests" / "e2e"))  # the tests' peft adapter maker

from e2e_helpers import make_peft_adapter  # noqa: E402

from treadle import Engine  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def timed(eng: Engine, prompts: list[str], params: dict, lora) -> float:
    eng.generate(prompt=prompts[:2], sampling_params={**params, "max_new_tokens": 4},
                 lora_path=None if lora is None or isinstance(lora, str) else lora[:2])  # warm-up
    eng.flush_cache()
    t = time.perf_counter()
    out = eng.generate(prompt=prompts, sampling_params=params, lora_path=lora)
    return sum(r["meta_info"]["completion_tokens"] for r in out) / (time.perf_counter() - t)


def main() -> None:
    p = bench_parser(__doc__)
    p.add_argument("--model", default="default")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    extra = engine_kwargs(a)
    res = Results("lora_bench", a.out, extra, model=a.model, device=a.device, requests=a.requests, tokens=a.tokens,
                  rank=a.rank)
    model_dir = model_files_dir(a.model)
    prompts = [f"Write a short story about the number {i}." for i in range(a.requests)]
    params = {"temperature": 0, "max_new_tokens": a.tokens, "ignore_eos": True}
    with tempfile.TemporaryDirectory() as d:
        names = [f"a{i}" for i in range(4)]
        for i, name in enumerate(names):
            make_peft_adapter(model_dir, f"{d}/{name}", a.rank, 2 * a.rank, TARGETS, seed=i)
        with Engine(model_path=a.model, device=a.device, random_seed=0, **extra) as eng:
            base = timed(eng, prompts, params, None)
        with Engine(model_path=a.model, device=a.device, random_seed=0, max_loras_per_batch=4,
                    lora_paths=[f"{n}={d}/{n}" for n in names], **extra) as eng:
            lora_base = timed(eng, prompts, params, None)
            one = timed(eng, prompts, params, "a0")
            mixed = timed(eng, prompts, params, [names[i % 4] for i in range(a.requests)])
    res.record("output_tok_s", base_engine=round(base, 1), lora_engine_base_requests=round(lora_base, 1),
               one_adapter=round(one, 1), four_adapters=round(mixed, 1))


if __name__ == "__main__":
    main()
