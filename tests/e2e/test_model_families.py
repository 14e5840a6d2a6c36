"""Qwen3, Phi-3 (fused checkpoint tensors, LongRoPE, partial rotary) and Llama with YaRN and
attention/MLP biases against HF transformers on tiny random-weight models (float32, CPU).

One engine per family, tensor-parallel over two ranks (gloo) with a 16-token prefill chunk:
greedy tokens equal HF ``generate``'s and logprobs are HF's within 1e-4, through chunked
prefill, with prompt logprobs from position 0, and again from the prefix cache.
"""

from __future__ import annotations

import pytest

from family_helpers import check_result, hf_greedy, save_tiny
from treadle import Engine

pytestmark = pytest.mark.e2e

TEXTS = ["The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
         "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) +",
         "Once upon a time, in a small village by the sea, there lived an old fisherman who",
         "List five fruits that are red, and explain for each one why it is red:",
         "1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233,",
         "Translate to French: The weather is lovely today and we are going to the park.",
         "Why is the sky blue? Answer in one long sentence, with the physics spelled out.",
         "The three primary colors are red, yellow and blue, and mixing any two of them gives"]


def build(family: str, path: str, tok_dir: str):
    from transformers import (LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    if family == "qwen3":  # head_dim 32 with hidden 64 over 4 heads: q is wider than the hidden state
        return save_tiny(Qwen3Config, Qwen3ForCausalLM, path, tok_dir, head_dim=32)
    if family == "phi3":  # LongRoPE within the original length: short factors and the attention factor
        # partial_rotary_factor 0.5 of head_dim 16: 8 rotary dims, 4 frequencies
        return save_tiny(Phi3Config, Phi3ForCausalLM, path, tok_dir, partial_rotary_factor=0.5,
                         original_max_position_embeddings=128, sliding_window=None,
                         rope_scaling={"type": "longrope", "short_factor": [1.0, 1.3, 1.7, 2.5],
                                       "long_factor": [2.0, 3.0, 4.0, 6.0]})
    return save_tiny(LlamaConfig, LlamaForCausalLM, path, tok_dir, attention_bias=True, mlp_bias=True,
                     rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})


# (prompts, new tokens) per family
SIZES = {"llama_yarn_bias": (8, 48), "qwen3": (8, 48), "phi3": (8, 48)}


@pytest.fixture(scope="module", params=list(SIZES))
def family(request, tmp_path_factory, default_model_dir, hf_tokenizer):
    name = request.param
    path = str(tmp_path_factory.mktemp(name))
    hf = build(name, path, default_model_dir)
    n, new = SIZES[name]
    prompts = [hf_tokenizer(t)["input_ids"] for t in TEXTS[:n]]
    assert all(len(p) > 16 for p in prompts)  # each prefill runs in several 16-token chunks
    refs = hf_greedy(hf, prompts, new)
    with Engine(model_path=path, tp_size=2, chunked_prefill_size=16, random_seed=0) as engine:
        yield name, engine, prompts, new, refs


def test_family_matches_hf(family):
    name, engine, prompts, new, refs = family
    params = {"temperature": 0, "max_new_tokens": new, "ignore_eos": True}
    runs = [dict(return_logprob=True),  # chunked prefill (no prompt logprobs asked)
            dict(return_logprob=True, logprob_start_len=0),  # whole-prompt logprobs
            dict(return_logprob=True)]  # the prompts again: a prefix cache hit
    for i, kw in enumerate(runs):
        res = engine.generate(input_ids=prompts, sampling_params=params, **kw)
        for r, ids, (want, ref) in zip(res, prompts, refs):
            check_result(r, ids, want, ref, inputs="logprob_start_len" in kw)
        if i == 0:  # every prefill ran in chunks of at most 16 tokens
            assert engine.get_server_info()["internal_states"][0]["max_step_prefill_tokens"] <= 16
        if i == 2:
            assert all(r["meta_info"]["cached_tokens"] >= len(ids) - 1 for r, ids in zip(res, prompts)), name
