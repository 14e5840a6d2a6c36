"""GPTQ checkpoints on the CPU (dequantized at load, ``gpu_worker/quant/int4_format.py``): a tiny
random Llama quantized with act order (``desc_act``), zero points and the ``gptq`` format's
stored-minus-one zeros by the reference packer (tests/int4_pack.py), against HF transformers
running the same dequantized weights. One engine for the module."""

from __future__ import annotations

import pytest
import torch

from e2e_helpers import make_int4_model
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
        ids = hf_tokenizer(prompt, return_tensors="pt").input_ids
        want = hf.generate(ids, do_sample=False, max_new_tokens=12, attention_mask=torch.ones_like(ids))[0, ids.shape[1]:]
        assert out["output_ids"] == want.tolist()
        with torch.no_grad():
            logits = hf(torch.cat([ids[0], want]).unsqueeze(0)).logits[0, ids.shape[1] - 1:-1].float()
        ref = torch.log_softmax(logits, -1).gather(1, want[:, None])[:, 0]
        got = torch.tensor([lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]])
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert info["quantization"] is None
    assert info["weight_bytes"] == sum(p.numel() * 4 for p in hf.parameters())  # the CPU's: dequantized float32
    with pytest.raises(ValueError, match="not an AWQ checkpoint"):
        Engine(model_path=path, quantization="awq_marlin")
