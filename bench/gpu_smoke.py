"""GPU smoke check: the engine end to end on CUDA against HF transformers on the same random weights.

    python bench/gpu_smoke.py --config-dir DIR   # DIR: config.json + tokenizer files (no weights)

Builds random HF weights from the config (seeded), saves them as safetensors, then compares
greedy tokens of Treadle (float32, CUDA) with HF generate (float32, CUDA), and times batch-1
and batch-32 decoding in bfloat16 for both.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time

import torch


def build_random_model(config_dir: str, out_dir: str, init_range: float = 0.2) -> None:
    """Seeded random HF weights; the default init range is wider than HF's, so that greedy
    argmax is not a near-tie (float32 token comparisons)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(config_dir)
    cfg.initializer_range = init_range
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out_dir)
    for f in os.listdir(config_dir):
        if f.startswith("tokenizer") or f.endswith(".jinja") or f == "generation_config.json":
            shutil.copy(os.path.join(config_dir, f), out_dir)


def hf_generate(model_dir: str, prompts: list[list[int]], new: int, dtype: torch.dtype) -> tuple[list[list[int]], float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).cuda().eval()
    outs = []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for ids in prompts:
        x = torch.tensor([ids], device="cuda")
        g = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False)
        outs.append(g[0, len(ids):].tolist())
    torch.cuda.synchronize()
    return outs, sum(map(len, outs)) / (time.perf_counter() - t0)


def treadle_run(model_dir: str, prompts: list[list[int]], new: int, dtype: str, concurrent: bool) -> tuple[list, float]:
    from treadle import Engine

    params = {"temperature": 0, "max_new_tokens": new, "ignore_eos": True}
    with Engine(model_path=model_dir, dtype=dtype, random_seed=0) as eng:
        eng.generate(input_ids=prompts[0], sampling_params={"max_new_tokens": 4})
        t0 = time.perf_counter()
        if concurrent:
            async def run():
                return await asyncio.gather(*[eng.async_generate(input_ids=p, sampling_params=params) for p in prompts])
            res = asyncio.run(run())
        else:
            res = [eng.generate(input_ids=p, sampling_params=params) for p in prompts]
        dt = time.perf_counter() - t0
    return [r["output_ids"] for r in res], sum(len(r["output_ids"]) for r in res) / dt


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config-dir", required=True)
    a = p.parse_args()
    d = tempfile.mkdtemp(prefix="treadle-smoke-")
    build_random_model(a.config_dir, d)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 40000, (int(n),), generator=g).tolist() for n in (7, 31, 64, 120)]
    ref, _ = hf_generate(d, prompts, 32, torch.float32)
    got, _ = treadle_run(d, prompts, 32, "float32", concurrent=False)
    same = sum(x == y for x, y in zip(ref, got))
    print(f"float32 CUDA greedy: {same}/{len(ref)} prompts identical to HF")
    for i, (x, y) in enumerate(zip(ref, got)):
        if x != y:
            k = next(j for j in range(len(x)) if x[j] != y[j])
            print(f"  prompt {i}: first difference at token {k}")
    one = [prompts[1]] * 3
    _, hf1 = hf_generate(d, one, 128, torch.bfloat16)
    _, tr1 = treadle_run(d, one, 128, "bfloat16", concurrent=False)
    print(f"batch 1, bf16, 128 new tokens: Treadle {tr1:.1f} tok/s, HF {hf1:.1f} tok/s")
    many = [torch.randint(0, 40000, (200,), generator=g).tolist() for _ in range(32)]
    _, tr32 = treadle_run(d, many, 128, "bfloat16", concurrent=True)
    print(f"32 concurrent, bf16, 128 new tokens: Treadle {tr32:.1f} tok/s")
    shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
