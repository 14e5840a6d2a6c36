"""AWQ checkpoints (AutoAWQ's 4-bit gemm layout): the loader's dequantization against weights
quantized and packed here from the format's description, and the engine against HF transformers
running the same dequantized weights."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from e2e_helpers import awq_quantize, engine_logprobs, hf_greedy, make_awq_model
from treadle import Engine
from treadle.gpu_worker.awq import awq_config, dequantize, unpack

GREEDY = {"temperature": 0, "max_new_tokens": 12}
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


def test_unpack_follows_the_awq_column_order():
    word = sum(v << (4 * i) for i, v in enumerate(range(8)))  # nibble i holds the value i
    assert unpack(torch.tensor([[word]], dtype=torch.int32)).tolist() == [[0, 4, 1, 5, 2, 6, 3, 7]]
    top = torch.tensor([[-1]], dtype=torch.int32)  # all nibbles 15, the sign bit included
    assert unpack(top).tolist() == [[15] * 8]


def test_dequantize_gives_the_quantized_weights():
    torch.manual_seed(0)
    w = torch.randn(48, 96)
    qweight, qzeros, scales, want = awq_quantize(w, 32)
    assert qweight.shape == (96, 6) and qzeros.shape == (3, 6) and scales.shape == (3, 48)
    got = dequantize(qweight, qzeros, scales, 32)
    assert torch.equal(got, want)
    assert (got - w).abs().max() < 0.6 * scales.float().max()  # and they are a 4-bit picture of w
    with pytest.raises(ValueError, match="do not fit together"):
        dequantize(qweight, qzeros, scales, 64)


def test_awq_config_checks():
    assert awq_config({"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 64}}) == {"group_size": 64}
    assert awq_config({"quantization_config": {"quant_method": "gptq"}}) is None and awq_config({}) is None
    with pytest.raises(NotImplementedError, match="bits=8"):
        awq_config({"quantization_config": {"quant_method": "awq", "bits": 8}})
    with pytest.raises(NotImplementedError, match="gemv"):
        awq_config({"quantization_config": {"quant_method": "awq", "version": "GEMV"}})


@pytest.fixture(scope="module")
def awq_model(tmp_path_factory, default_model_dir):
    path = str(tmp_path_factory.mktemp("awq"))
    return path, make_awq_model(path, default_model_dir)


def test_engine_matches_hf_on_the_dequantized_weights(awq_model, hf_tokenizer):
    path, hf = awq_model
    with Engine(model_path=path, quantization="awq", random_seed=0) as engine:
        outs = engine.generate(prompt=PROMPTS, sampling_params=GREEDY, return_logprob=True)
        auto = engine.get_server_info()
    for prompt, out in zip(PROMPTS, outs):
        want, ref = hf_greedy(hf, hf_tokenizer, prompt, GREEDY["max_new_tokens"])
        assert out["output_ids"] == want
        torch.testing.assert_close(engine_logprobs(out), ref, atol=1e-4, rtol=0)
    assert auto["quantization"] == "awq"


def test_awq_is_detected_without_asking_and_checked_when_asked(awq_model):
    path, hf = awq_model
    with Engine(model_path=path, random_seed=0, tp_size=2) as engine:  # quantization=None: read from config.json
        out = engine.generate(prompt=PROMPTS[0], sampling_params=GREEDY)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(path)(PROMPTS[0], return_tensors="pt").input_ids
    want = hf.generate(ids, do_sample=False, max_new_tokens=12, attention_mask=torch.ones_like(ids))[0, ids.shape[1]:]
    assert out["output_ids"] == want.tolist()
    with pytest.raises(ValueError, match="not an AWQ checkpoint"):
        Engine(model_path="default", quantization="awq")
    with pytest.raises(ValueError, match="is an AWQ checkpoint"):
        Engine(model_path=path, quantization="gguf")


def test_unsupported_awq_variant_refused_before_start(awq_model, tmp_path):
    """An 8-bit AWQ config.json: NotImplementedError from the client, no process started."""
    path, _ = awq_model
    for name in os.listdir(path):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(path, name), tmp_path / name)
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    cfg["quantization_config"]["bits"] = 8
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(NotImplementedError, match="bits=8"):
        Engine(model_path=str(tmp_path))
