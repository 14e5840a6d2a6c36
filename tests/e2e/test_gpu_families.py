"""Qwen3, Phi-3 (LongRoPE, partial rotary 0.75 as Phi-4-mini) and Llama with YaRN and biases on
CUDA against HF transformers on the same random weights, as ``test_gpu_parity.py`` checks Llama:

1. bfloat16 teacher-forced logits (prefill, then 32 decode steps of 3 sequences, Triton backend,
   CUDA graphs) within 1e-2 relative of HF bf16 (an error past that but within HF's own
   eager-vs-sdpa distance is an expected failure: bf16 noise); mini shapes (``bench/configs``) and
   the Qwen3-8B shape.
2. float32: the Engine's 32 greedy tokens of 4 prompts equal HF ``generate``'s (mini shapes).

    python -m pytest tests/e2e/test_gpu_families.py -m gpu -s
"""

from __future__ import annotations

import pytest
import torch

from gpu_helpers import first_differences, hf_generate, needs_gpus, random_prompts, treadle_run
from test_gpu_parity import BF16_TOL, HF_INIT, WIDE_INIT, logits_errors, random_model  # noqa: F401 (a fixture)

pytestmark = [*needs_gpus(1), pytest.mark.e2e]

MINI = ["qwen3-mini", "phi3-mini-longrope", "llama-yarn-bias-mini"]


@pytest.mark.parametrize("shape", MINI + ["qwen3-8b"])
def test_bf16_logits_match_hf(random_model, shape):
    err, vs_fp32, hf_floor, hf_impls = logits_errors(random_model(shape, HF_INIT))
    report = (f"{shape}: bf16 logits, prefill + 32 decode steps (graphs): max relative error {err:.2e} vs HF bf16, "
              f"{vs_fp32:.2e} vs HF fp32 (HF bf16 vs fp32: {hf_floor:.2e}; HF eager vs sdpa: {hf_impls:.2e})")
    print(report)
    if BF16_TOL <= err <= hf_impls:
        pytest.xfail(f"{report}: over {BF16_TOL:g}, within HF's own eager-vs-sdpa distance (bf16 noise)")
    assert err < BF16_TOL, report


@pytest.mark.parametrize("shape", MINI)
def test_float32_greedy_matches_hf(random_model, shape):
    prompts = random_prompts((7, 31, 64, 120))
    d = random_model(shape, WIDE_INIT)
    want, _ = hf_generate(d, prompts, 32, torch.float32)
    got, _ = treadle_run(d, prompts, 32, "float32", concurrent=True)
    print(f"{shape}: float32 greedy: {sum(x == y for x, y in zip(want, got))}/{len(want)} prompts identical to HF")
    assert got == want, f"first differing token per prompt: {first_differences(want, got)}"
