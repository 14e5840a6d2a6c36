"""``modules_to_not_convert`` in an AWQ checkpoint: the layers it names are stored dense (``weight``),
the others packed. A ``ModelRunner`` loads it on the CPU both ways an engine can (dequantized at
load, and on packed 4-bit layers as CUDA builds them: their product is dequantize-then-matmul
here) and must give transformers' greedy tokens and logits on the same float32 weights."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from int4_pack import awq_quantize
from kernel_helpers import Alloc
from treadle.gpu_worker import model_loader
from treadle.gpu_worker.model_runner import ModelRunner, RunnerConfig
from treadle.gpu_worker.quant.not_converted import not_converted
from treadle.gpu_worker.quant.int4_linear import Int4Method
from treadle.runtime.messages import ForwardPlan, NewSlot, PlanRow, SamplingSpec

CONFIG = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.08, bos_token_id=None,
              eos_token_id=None, pad_token_id=0, tie_word_embeddings=False)
# left dense: all of layer 0's attention (by prefix) and layer 1's down_proj (by suffix, as in transformers)
SKIP = ["lm_head", "model.layers.0.self_attn", "1.mlp.down_proj"]
DENSE = {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
         "model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"}
PROMPTS = [[5, 17, 99, 3, 250], [7, 7, 8, 200, 11, 42]]


@pytest.fixture(scope="module")
def awq_dir(tmp_path_factory):
    """(an AWQ checkpoint with DENSE left float, HF's model on the same, dequantized, weights)."""
    root = str(tmp_path_factory.mktemp("awq_skip"))
    torch.manual_seed(0)
    hf, tensors = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval(), {}
    with torch.no_grad():
        for name, p in hf.named_parameters():
            base = name[:-len(".weight")]
            if not name.endswith("proj.weight") or base in DENSE:
                tensors[name] = p.data.clone()
                continue
            qw, qz, sc, deq = awq_quantize(p.data, 32)
            p.copy_(deq)
            tensors.update({f"{base}.qweight": qw, f"{base}.qzeros": qz, f"{base}.scales": sc})
    save_file(tensors, os.path.join(root, "model.safetensors"))
    cfg = hf.config.to_dict()
    cfg.update(architectures=["LlamaForCausalLM"], quantization_config={
        "quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": SKIP})
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(cfg, f)
    return root, hf


def _greedy(runner: ModelRunner, steps: int) -> tuple[dict[int, list[int]], torch.Tensor]:
    """Greedy tokens of every prompt, decoded together, and the prefill's last logits."""
    alloc, out = Alloc(len(PROMPTS), 256), {s: [] for s in range(len(PROMPTS))}
    plan = ForwardPlan(step=0, new_slots=[NewSlot(s, SamplingSpec(temperature=0.0)) for s in out],
                       rows=[PlanRow(s, p, 0, alloc(len(p))) for s, p in enumerate(PROMPTS)])
    logits = runner.forward_logits(plan)
    for step in range(steps):
        rows = plan.rows if step == 0 else [PlanRow(s, [out[s][-1]], len(PROMPTS[s]) + len(out[s]) - 1, alloc(1))
                                            for s in out]
        ids, _ = runner.forward(ForwardPlan(step=step, new_slots=plan.new_slots if step == 0 else [], rows=rows))
        for row, tok in zip(rows, ids):
            out[row.slot].append(tok)
    return out, logits


@torch.no_grad()
@pytest.mark.parametrize("packed", [False, True], ids=["dequantized", "packed"])
def test_layers_left_dense_load_beside_4bit_ones(awq_dir, packed, monkeypatch):
    path, hf = awq_dir
    if packed:  # build as on CUDA: 4-bit layers where the checkpoint has packed ones
        monkeypatch.setattr(model_loader, "_packed_on", lambda device: True)
    runner = ModelRunner(RunnerConfig(model_dir=path, device="cpu", dtype="float32", kv_tokens=256, max_slots=4,
                                      context_len=128))
    int4 = {n for n, m in runner.model.named_modules() if isinstance(getattr(m, "quant", None), Int4Method)}
    want_int4 = {"model.layers.0.mlp.gate_up_proj", "model.layers.1.self_attn.qkv_proj",
                 "model.layers.1.self_attn.o_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.gate_up_proj"}
    assert int4 == (want_int4 if packed else set())
    tokens, logits = _greedy(runner, 8)
    for s, p in enumerate(PROMPTS):
        ids = torch.tensor([p])
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                           do_sample=False, pad_token_id=0)[0, len(p):].tolist()
        assert tokens[s] == want
        torch.testing.assert_close(logits[s], hf(ids).logits[0, -1].float(), atol=1e-4, rtol=0)


def test_not_converted_follows_transformers_matching():
    """A pattern matches from the start up to a module boundary (also as a regex), or as a suffix."""
    skip = ["lm_head", "model.layers.1", "mlp.gate", "visual", "re:.*layers\\.3\\..*_proj$"]
    yes = ["lm_head", "model.layers.1.self_attn.q_proj", "model.layers.7.mlp.gate", "visual.blocks.0.attn.qkv",
           "model.layers.3.mlp.up_proj"]
    no = ["model.layers.11.self_attn.q_proj", "model.layers.7.mlp.gate_proj", "model.visual_x.q_proj",
          "model.layers.3.mlp.act"]
    assert [not_converted(n, skip) for n in yes] == [True] * len(yes)
    assert [not_converted(n, skip) for n in no] == [False] * len(no)


def test_the_configs_name_the_layers_kept_dense():
    """AWQ and GPTQ read modules_to_not_convert; GPTQModel's ``dynamic`` "-:" rules are regexes of
    modules left unquantized (its per-module settings are refused before start-up)."""
    from treadle.gpu_worker.quant.int4_format import int4_config
    from treadle.runtime.hf_config import gptq_params

    awq = {"quant_method": "awq", "bits": 4, "group_size": 32, "modules_to_not_convert": ["visual"]}
    assert int4_config({"quantization_config": awq}).skip == ("visual",)
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 32, "modules_to_not_convert": ["lm_head"],
            "dynamic": {r"-:.*\.1\.mlp\..*": {}}}
    skip = int4_config({"quantization_config": gptq}).skip
    assert skip == ("lm_head", r"re:.*\.1\.mlp\..*") and not_converted("model.layers.1.mlp.down_proj", skip)
    with pytest.raises(NotImplementedError, match="dynamic per-module settings"):
        gptq_params({**gptq, "dynamic": {r"+:.*\.18\..*": {"bits": 8}}})


def test_a_fused_layer_with_parts_of_both_kinds_is_refused(monkeypatch):
    """q_proj dense but k_proj/v_proj 4-bit cannot share one fused packed layer: a ValueError that
    names the layer and its parts, at build time (on CUDA; the CPU dequantizes every part)."""
    cfg = LlamaConfig(**CONFIG)
    cfg.quantization_config = {"quant_method": "awq", "bits": 4, "group_size": 32,
                               "modules_to_not_convert": ["model.layers.1.self_attn.q_proj"]}
    model = model_loader.build_model(cfg, torch.float32, torch.device("cpu"), 64)  # the CPU: dense layers
    assert model.model.layers[1].self_attn.qkv_proj.weight.shape == (128, 64)
    with monkeypatch.context() as m, pytest.raises(ValueError, match=r"\['model\.layers\.1\.self_attn\.q_proj'\] dense "
                                                                     r"but not .*k_proj.*v_proj.*qkv_proj"):
        m.setattr(model_loader, "_packed_on", lambda device: True)
        model_loader.build_model(cfg, torch.float32, torch.device("cpu"), 64)
