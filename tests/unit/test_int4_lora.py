"""A whole ModelRunner on packed 4-bit layers (built as on CUDA; on the CPU their product is
dequantize-then-matmul), with a LoRA adapter on top: its logits against PEFT on the dequantized
base, so the loading by HF names, the fused layers and the adapter's delta on a 4-bit base
(gpu_worker/lora.py reads the layer's sizes, not a dense weight) are checked without a GPU."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from int4_pack import awq_quantize
from treadle.gpu_worker import model_runner
from treadle.gpu_worker.layers.linear import quantized_layers
from treadle.gpu_worker.lora import LoRAPool
from treadle.gpu_worker.lora_adapter import read_adapter
from treadle.gpu_worker.model_loader import _building
from treadle.gpu_worker.models.registry import get_model_class
from treadle.gpu_worker.quant.int4_format import int4_config
from treadle.gpu_worker.quant.int4_linear import Int4Method
from treadle.runtime.messages import ForwardPlan, NewSlot, PlanRow, SamplingSpec

peft = pytest.importorskip("peft")

CONFIG = dict(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.08, bos_token_id=None,
              eos_token_id=None, pad_token_id=0)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(AWQ checkpoint, the dequantized base as a plain HF checkpoint, a PEFT adapter on it)."""
    root = tmp_path_factory.mktemp("int4lora")
    torch.manual_seed(0)
    hf, tensors = LlamaForCausalLM(LlamaConfig(**CONFIG)), {}
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("proj.weight"):
                qw, qz, sc, deq = awq_quantize(p.data, 32)
                p.copy_(deq)
                base = name[:-len(".weight")]
                tensors.update({f"{base}.qweight": qw, f"{base}.qzeros": qz, f"{base}.scales": sc})
            else:
                tensors[name] = p.data.clone()
    awq, dense, adapter = (str(root / n) for n in ("awq", "dense", "adapter"))
    os.makedirs(awq)
    save_file(tensors, os.path.join(awq, "model.safetensors"))
    cfg = hf.config.to_dict()
    cfg.update(architectures=["LlamaForCausalLM"], quantization_config={"quant_method": "awq", "bits": 4,
                                                                          "group_size": 32})
    with open(os.path.join(awq, "config.json"), "w") as f:
        json.dump(cfg, f)
    hf.save_pretrained(dense)
    torch.manual_seed(1)
    targets = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
    peft.get_peft_model(LlamaForCausalLM.from_pretrained(dense),
                        peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
                        ).save_pretrained(adapter)
    return awq, dense, adapter


def _build_packed(model_config, dtype, device, context_len, quantization=None):
    """model_loader.build_model as it builds on CUDA: 4-bit linear layers."""
    with _building(dtype, device), quantized_layers(Int4Method(int4_config(model_config))):
        return get_model_class(model_config)(model_config, max_positions=context_len)


@torch.no_grad()
def test_lora_on_packed_layers_matches_peft(dirs, monkeypatch):
    awq, dense, adapter = dirs
    monkeypatch.setattr(model_runner, "build_model", _build_packed)
    runner = model_runner.ModelRunner(model_runner.RunnerConfig(model_dir=awq, device="cpu", dtype="float32",
                                                                kv_tokens=256, max_slots=4, context_len=128))
    assert sum(isinstance(m.quant, Int4Method) for m in runner.model.modules() if hasattr(m, "quant")) == 8
    pool = LoRAPool(runner.model, num_slots=2, max_rank=8, device="cpu", dtype=torch.float32)
    pool.load(1, read_adapter(adapter))
    prompts = [[5, 17, 99, 3, 250], [7, 7, 8, 400]]
    slots = [1, -1]  # the adapter, the base model
    pool.set_token_slots(torch.tensor([s for p, s in zip(prompts, slots) for _ in p]))
    plan = ForwardPlan(step=0, new_slots=[NewSlot(i, SamplingSpec(temperature=0.0)) for i in range(2)],
                       rows=[PlanRow(0, prompts[0], 0, list(range(5))), PlanRow(1, prompts[1], 0, list(range(8, 12)))])
    logits = runner.forward_logits(plan)
    base = LlamaForCausalLM.from_pretrained(dense).eval()
    with_adapter = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(dense), adapter).eval()
    for row, p, ref in zip(logits, prompts, (with_adapter, base)):
        torch.testing.assert_close(row, ref(torch.tensor([p])).logits[0, -1].float(), atol=1e-4, rtol=0)
    assert (logits[0] - base(torch.tensor([prompts[0]])).logits[0, -1]).abs().max() > 1e-2  # the adapter counts
