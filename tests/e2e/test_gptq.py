"""GPTQ checkpoints on the CPU (dequantized at load, ``gpu_worker/quant/int4_format.py``): a tiny
random Llama quantized with act order (``desc_act``), zero points and the ``gptq`` format's
stored-minus-one zeros by the reference packer (tests/int4_pack.py), against HF transformers
running the same dequantized weights. One engine for the module."""

from __future__ import annotations

import pytest
import torch

from e2e_helpers import engine_logprobs, hf_greedy, make_int4_model
from treadle import Engine

pytestmark = pytest.mark.e2e

GREEDY = {"temperature": 0, "max_new_tokens": 12}
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
QUANT = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False,
         "checkpoint_format": "gptq"}


@pytest.fixture(scope="module")
def gptq_model(tmp_path_factory, default_model_dir):
    path = str(tmp_path_factory.mktemp("gptq"))
    return path, make_int4_model(path, default_model_dir, QUANT)


def test_engine_matches_hf_on_the_dequantized_weights(gptq_model, hf_tokenizer):
    path, hf = gptq_model
    with Engine(model_path=path, random_seed=0) as engine:  # quantization=None: read from config.json
        outs = engine.generate(prompt=PROMPTS, sampling_params=GREEDY, return_logprob=True)
        info = engine.get_server_info()
    for prompt, out in zip(PROMPTS, outs):
        want, ref = hf_greedy(hf, hf_tokenizer, prompt, GREEDY["max_new_tokens"])
        assert out["output_ids"] == want
        torch.testing.assert_close(engine_logprobs(out), ref, atol=1e-4, rtol=0)
    assert info["quantization"] is None
    assert info["weight_bytes"] == sum(p.numel() * 4 for p in hf.parameters())  # the CPU's: dequantized float32
    with pytest.raises(ValueError, match="not an AWQ checkpoint"):
        Engine(model_path=path, quantization="awq_marlin")
