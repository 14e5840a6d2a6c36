"""Mixture-of-experts models against transformers on tiny random-weight checkpoints (8 experts,
top-2, 3 layers, hidden 64; float32 on the CPU): greedy tokens of 8 prompts x 48 tokens equal
HF ``generate``'s and every prompt and output logprob is HF's within 1e-4, through 16-token
prefill chunks, on two ranks (gloo) both ways: each expert sliced over the ranks (``tp_size=2``)
and whole experts per rank with tokens exchanged all-to-all (``ep_size=2``).

Qwen3-MoE's middle layer is dense (``mlp_only_layers``), so a model mixing both blocks is
covered; Qwen2-MoE (a shared expert behind a sigmoid gate) runs at ``ep_size=2`` on fewer tokens.
"""

from __future__ import annotations

import pytest

from family_helpers import check_result, hf_greedy, save_tiny
from test_model_families import TEXTS
from treadle import Engine

pytestmark = pytest.mark.e2e

MOE = dict(num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True)


def build(family: str, path: str, tok_dir: str):
    from transformers import (MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM,
                              Qwen3MoeConfig, Qwen3MoeForCausalLM)

    if family == "mixtral":
        return save_tiny(MixtralConfig, MixtralForCausalLM, path, tok_dir, num_local_experts=8,
                         num_experts_per_tok=2, sliding_window=None)
    if family == "qwen3_moe":  # head_dim 32: q wider than the hidden state, as in Qwen3-30B-A3B
        return save_tiny(Qwen3MoeConfig, Qwen3MoeForCausalLM, path, tok_dir, num_experts=8, head_dim=32,
                         mlp_only_layers=[1], **MOE)
    return save_tiny(Qwen2MoeConfig, Qwen2MoeForCausalLM, path, tok_dir, num_experts=8,
                     shared_expert_intermediate_size=96, **dict(MOE, norm_topk_prob=False))


# family: (prompts, new tokens, ep_size values)
RUNS = {"mixtral": (8, 48, (1, 2)), "qwen3_moe": (8, 48, (1, 2)), "qwen2_moe": (4, 24, (2,))}


@pytest.fixture(scope="module", params=list(RUNS))
def family(request, tmp_path_factory, default_model_dir, hf_tokenizer):
    name = request.param
    path = str(tmp_path_factory.mktemp(name))
    hf = build(name, path, default_model_dir)
    n, new, eps = RUNS[name]
    prompts = [hf_tokenizer(t)["input_ids"] for t in TEXTS[:n]]
    return name, path, prompts, new, eps, hf_greedy(hf, prompts, new)


def test_moe_matches_hf_with_tp_and_ep(family):
    name, path, prompts, new, eps, refs = family
    params = {"temperature": 0, "max_new_tokens": new, "ignore_eos": True}
    for ep in eps:
        with Engine(model_path=path, tp_size=2, ep_size=ep, chunked_prefill_size=16, random_seed=0) as engine:
            assert engine.get_server_info()["ep_size"] == ep
            res = engine.generate(input_ids=prompts, sampling_params=params, return_logprob=True,
                                  logprob_start_len=0)
            for r, ids, (want, ref) in zip(res, prompts, refs):
                check_result(r, ids, want, ref, inputs=True)
            # both ways each rank holds half the expert weights
            shares = [engine._sup.ready_info[f"worker{r}"]["num_params"] for r in range(2)]
            assert abs(shares[0] - shares[1]) <= 0.02 * shares[0], (name, ep, shares)
