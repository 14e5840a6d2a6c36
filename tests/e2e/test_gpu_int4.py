"""4-bit checkpoints served from packed weights on CUDA (``quant/int4_linear.py`` and the Triton
kernels): tiny random AWQ and GPTQ (act order) Llamas from the reference packer against HF
transformers (float32, CPU) on the dequantized weights, with a LoRA adapter on top of the 4-bit
base (the adapter stays dense), and with TP=2 where two GPUs exist. The engines run in float32
(the GEMM's ``tl.dot`` in IEEE precision), so greedy tokens must be equal."""

from __future__ import annotations

import pytest
import torch

from e2e_helpers import make_int4_model, make_peft_adapter
from gpu_helpers import needs_gpus, smollm2_dir
from treadle import Engine

pytestmark = [*needs_gpus(1), pytest.mark.e2e]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
GREEDY = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False}


def _greedy(model, tok, prompt: str) -> list[int]:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=GREEDY["max_new_tokens"], do_sample=False,
                             pad_token_id=tok.eos_token_id, eos_token_id=None)
    return gen[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (checkpoint dir, HF float32 model on its dequantized weights)."""
    tok_dir = smollm2_dir()
    out = {}
    for name, quant in (("awq", AWQ), ("gptq", GPTQ)):
        path = str(tmp_path_factory.mktemp(name))
        out[name] = path, make_int4_model(path, tok_dir, quant, hidden=128)
    return out


@pytest.mark.parametrize("name", ["awq", "gptq"])
def test_packed_engine_matches_hf(models, name):
    from transformers import AutoTokenizer

    path, hf = models[name]
    tok = AutoTokenizer.from_pretrained(path)
    with Engine(model_path=path, dtype="float32", random_seed=0) as engine:
        outs = engine.generate(prompt=PROMPTS, sampling_params=GREEDY)
        one = engine.generate(prompt=PROMPTS[0], sampling_params=GREEDY)  # batch 1: the GEMV
        info = engine.get_server_info()
    want = [_greedy(hf, tok, p) for p in PROMPTS]
    assert [o["output_ids"] for o in outs] == want
    assert one["output_ids"] == want[0]
    dense = sum(p.numel() * 4 for p in hf.parameters())
    proj = sum(p.numel() * 4 for n, p in hf.named_parameters() if n.endswith("proj.weight"))
    assert info["weight_bytes"] < dense - proj * 0.8  # the projections packed: 4 bits, not 32, a weight


def test_lora_on_a_packed_base(models, tmp_path):
    """The adapter's delta adds to the 4-bit base's output: the engine against peft on the
    dequantized base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, hf = models["awq"]
    base_dir, adapter_dir = tmp_path / "dense", tmp_path / "adapter"
    hf.save_pretrained(base_dir)
    make_peft_adapter(str(base_dir), str(adapter_dir), 8, 16, ["q_proj", "v_proj", "down_proj"], seed=3)
    tok = AutoTokenizer.from_pretrained(path)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                     str(adapter_dir)).eval()
    want = [_greedy(peft, tok, p) for p in PROMPTS]
    assert want != [_greedy(hf, tok, p) for p in PROMPTS]
    with Engine(model_path=path, dtype="float32", random_seed=0, lora_paths=[f"a={adapter_dir}"]) as engine:
        outs = engine.generate(prompt=PROMPTS, sampling_params=GREEDY, lora_path=["a"] * len(PROMPTS))
    assert [o["output_ids"] for o in outs] == want


def test_layers_left_dense_beside_packed_ones_and_updates_refused(tmp_path):
    """``modules_to_not_convert``: the layers it names load dense on CUDA, the others packed
    (greedy tokens equal HF's on the same weights); a weight update of the 4-bit model is refused
    with the reason, and the engine serves on."""
    from transformers import AutoTokenizer

    dense = ("model.layers.0.self_attn.", "model.layers.1.mlp.down_proj")
    quant = {**AWQ, "modules_to_not_convert": ["model.layers.0.self_attn", "1.mlp.down_proj"]}
    hf = make_int4_model(str(tmp_path), smollm2_dir(), quant, hidden=128, dense=dense)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    with Engine(model_path=str(tmp_path), dtype="float32", random_seed=0) as engine:
        outs = engine.generate(prompt=PROMPTS, sampling_params=GREEDY)
        ok, message = engine.update_weights_from_tensor([("model.norm.weight", torch.ones(128))])
        again = engine.generate(prompt=PROMPTS[0], sampling_params=GREEDY)
    want = [_greedy(hf, tok, p) for p in PROMPTS]
    assert [o["output_ids"] for o in outs] == want
    assert not ok and "4-bit (AWQ) model is not supported" in message and "calibration" in message
    assert again["output_ids"] == want[0]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_tensor_parallel_packed_shards(models):
    from transformers import AutoTokenizer

    for name in ("awq", "gptq"):  # GPTQ act order: each rank's inputs are whole groups only by luck: refused
        path, hf = models[name]
        if name == "gptq":
            with pytest.raises(Exception, match="straddle"):
                Engine(model_path=path, dtype="float32", tp_size=2)
            continue
        tok = AutoTokenizer.from_pretrained(path)
        with Engine(model_path=path, dtype="float32", tp_size=2, random_seed=0) as engine:
            outs = engine.generate(prompt=PROMPTS, sampling_params=GREEDY)
        assert [o["output_ids"] for o in outs] == [_greedy(hf, tok, p) for p in PROMPTS]
