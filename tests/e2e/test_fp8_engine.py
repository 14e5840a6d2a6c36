"""FP8 weights and torchao_config through the engine on the CPU.

- An FP8 checkpoint with 32x32 block scales (the DeepSeek/Qwen3 form, made by the reference packer
  in ``tests/fp8_checkpoints.py``), detected from config.json, served at ``tp_size=2`` (scales
  sliced with the weights): greedy tokens and logprobs equal transformers' on the dequantized weights.
  Its ``ignored_layers`` leave part of two fused layers float (q_proj beside FP8 k/v in layer 0,
  up_proj beside an FP8 gate_proj in layer 1; the other fused layers are all FP8).
- ``quantization="fp8"`` on SmolLM2-135M's float checkpoint with an FP8 KV cache: the CPU runs the
  FP8-rounded weights (a round trip) and the greedy answer is still right.
- ``torchao_config``: the engine equals transformers' model quantized by torchao with the same
  recipe (same tokens, logprobs within 2e-3), and the recipe moved that model's logprobs away from
  the float model's by more than ten times that (so a float engine would fail); recipes the CPU cannot run are refused before any process starts.
"""

from __future__ import annotations

import pytest
import torch

from e2e_helpers import engine_logprobs, hf_greedy
from fp8_checkpoints import MIXED, MIXED_RULES, make_fp8_model, save_model, tiny_llama
from treadle import Engine

pytestmark = pytest.mark.e2e

GREEDY = {"temperature": 0, "max_new_tokens": 8}
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


def test_block_fp8_checkpoint_at_tp2_matches_hf_on_dequantized_weights(tmp_path, default_model_dir, hf_tokenizer):
    hf = make_fp8_model(str(tmp_path), default_model_dir, "block", float_modules=MIXED, rules=MIXED_RULES["block"])
    with Engine(model_path=str(tmp_path), tp_size=2, random_seed=0) as engine:  # quantization read from config.json
        outs = engine.generate(prompt=PROMPTS, sampling_params=GREEDY, return_logprob=True)
    for prompt, out in zip(PROMPTS, outs):
        want, ref = hf_greedy(hf, hf_tokenizer, prompt, GREEDY["max_new_tokens"])
        assert out["output_ids"] == want
        torch.testing.assert_close(engine_logprobs(out), ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="is an FP8 checkpoint"):
        Engine(model_path=str(tmp_path), quantization="awq")


def test_quantization_fp8_with_fp8_kv_cache_answers_right():
    with Engine(model_path="default", quantization="fp8", kv_cache_dtype="fp8_e4m3", random_seed=0) as engine:
        out = engine.generate(prompt="The capital of France is", sampling_params={"temperature": 0, "max_new_tokens": 8})
    assert "Paris" in out["text"]


@pytest.fixture(scope="module")
def float_model(tmp_path_factory, default_model_dir):
    path = str(tmp_path_factory.mktemp("float"))
    hf, tok = tiny_llama(default_model_dir, seed=1)
    save_model(hf, tok, default_model_dir, path)
    return path, hf, tok


@pytest.mark.parametrize("recipe", ["int8wo", "fp8wo"])
def test_torchao_recipes_match_hf_quantized_the_same_way(recipe, float_model):
    import copy

    from torchao.quantization import quantize_

    from treadle.gpu_worker.torchao_quant import torchao_recipe

    path, hf, tok = float_model
    quantized = copy.deepcopy(hf)
    quantize_(quantized.model, torchao_recipe(recipe))  # the decoder's linears; the LM head stays float
    with Engine(model_path=path, torchao_config=recipe, random_seed=0) as engine:
        outs = engine.generate(prompt=PROMPTS, sampling_params=GREEDY, return_logprob=True)
        held = engine._sup.ready_info["worker0"]["weight_bytes"]
    linear = sum(p.numel() for n, p in hf.named_parameters() if n.endswith("proj.weight"))
    assert held < sum(p.numel() * 4 for p in hf.parameters()) - 2 * linear  # 1-byte weights (+ scales), not 4
    moved = 0.0
    for prompt, out in zip(PROMPTS, outs):
        want, ref = hf_greedy(quantized, tok, prompt, GREEDY["max_new_tokens"])
        assert out["output_ids"] == want
        torch.testing.assert_close(engine_logprobs(out), ref, atol=2e-3, rtol=0)
        _, float_ref = hf_greedy(hf, tok, prompt, GREEDY["max_new_tokens"])
        moved = max(moved, (ref - float_ref).abs().max().item())
    assert moved > 10 * 2e-3  # quantizing moves logprobs far more than the tolerance: the engine did quantize


@pytest.mark.parametrize("recipe, error", [("int4wo-128", NotImplementedError), ("fp8dq-per_row", NotImplementedError),
                                           ("int4wo-100", ValueError), ("int8dq", ValueError)])
def test_torchao_recipes_the_cpu_cannot_run_are_refused(recipe, error):
    with pytest.raises(error, match="torchao_config"):
        Engine(model_path="default", torchao_config=recipe, device="cpu")
