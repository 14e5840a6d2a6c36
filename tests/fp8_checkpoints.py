"""A reference FP8 packer and tiny FP8 checkpoints, written from the formats' descriptions (not
from Treadle's loader): what the Llama-3 FP8 (``fp8``, per-tensor), llm-compressor
(``compressed-tensors``, per-channel) and DeepSeek/Qwen3-FP8 (``fp8`` with ``weight_block_size``)
releases store."""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
from typing import Optional

import torch

E4M3, E4M3_MAX = torch.float8_e4m3fn, 448.0
BLOCK = 32  # the tiny models' block edge (the releases use 128; hidden 64 would be one block)


def fp8_pack(w: torch.Tensor, form: str, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, scale, dequantized)`` of a float ``w [out, in]``: ``form`` ``tensor`` (scale ``[]``),
    ``channel`` (``[out, 1]``) or ``block`` (``[ceil(out/b), ceil(in/b)]``), ``w ~ q * scale``."""
    w = w.float()
    if form == "tensor":
        s = w.abs().max() / E4M3_MAX
        q = (w / s).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
        return q, s.reshape(()), q.float() * s
    if form == "channel":
        s = w.abs().amax(dim=1, keepdim=True) / E4M3_MAX
        q = (w / s).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
        return q, s, q.float() * s
    n, k = w.shape
    nb, kb = math.ceil(n / block), math.ceil(k / block)
    padded = torch.zeros(nb * block, kb * block)
    padded[:n, :k] = w
    tiles = padded.reshape(nb, block, kb, block)
    s = tiles.abs().amax(dim=(1, 3)) / E4M3_MAX
    full = s.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    q = (w / full).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, s, q.float() * full


def rounded_activations(x: torch.Tensor, group: int) -> torch.Tensor:
    """``x [M, K]`` as the FP8 x FP8 products see it: rounded to e4m3 per token and ``group`` columns."""
    m, k = x.shape
    kb = -(-k // group)
    s = torch.nn.functional.pad(x, (0, kb * group - k)).reshape(m, kb, group).abs().amax(2) / E4M3_MAX
    s = s.clamp(min=1.0 / (E4M3_MAX * 512.0)).repeat_interleave(group, 1)[:, :k]
    return (x / s).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).float() * s


QUANT_CONFIGS = {
    "tensor": {"quant_method": "fp8", "activation_scheme": "static"},
    "block": {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": None},
    "channel": {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
                "config_groups": {"group_0": {"targets": ["Linear"],
                                              "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                                              "input_activations": {"num_bits": 8, "type": "float", "dynamic": True,
                                                                    "strategy": "token"}}}},
}


def tiny_llama(tokenizer_dir: str, seed: int = 0, **overrides):
    """A tiny random HF Llama (float32) with the test tokenizer's vocabulary; ``overrides`` of its
    ``LlamaConfig`` (sizes) as keywords."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    sizes = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "initializer_range": 0.1, **overrides}
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=512, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **sizes)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval(), tok


def save_model(hf, tok, tokenizer_dir: str, out_dir: str, tensors: Optional[dict] = None,
               quantization_config: Optional[dict] = None) -> None:
    """``hf``'s config (plus ``quantization_config``), ``tensors`` (default: its own) and the tokenizer."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors = tensors if tensors is not None else {n: p.data.clone() for n, p in hf.named_parameters()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "model.safetensors"))
    d = hf.config.to_dict()
    d["architectures"] = ["LlamaForCausalLM"]
    if quantization_config is not None:
        d["quantization_config"] = quantization_config
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(d, f)
    tok.save_pretrained(out_dir)
    for extra in glob.glob(os.path.join(tokenizer_dir, "*.jinja")):
        shutil.copy(extra, out_dir)


# Modules left float by a rule while the rest of their fused layer is FP8 (q_proj beside FP8 k/v,
# up_proj beside an FP8 gate_proj), and rules naming them in each form's spelling.
MIXED = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj")
MIXED_RULES = {"tensor": list(MIXED), "block": ["model.layers.0.self_attn.q_proj", "1.mlp.up_proj"],
               "channel": ["re:.*layers\\.0\\.self_attn\\.q_proj$", "re:.*layers\\.1\\.mlp\\.up_proj$"]}
IGNORE_KEYS = {"fp8": "ignored_layers", "compressed-tensors": "ignore", "fbgemm_fp8": "modules_to_not_convert"}


def make_fp8_model(out_dir: str, tokenizer_dir: str, form: str, seed: int = 0, block: int = BLOCK,
                   float_modules: tuple[str, ...] = (), rules: Optional[list[str]] = None, **overrides):
    """A tiny random Llama (``tiny_llama``) saved as an FP8 checkpoint of ``form`` (``QUANT_CONFIGS``;
    ``block``: the block edge); returns HF's float32 model holding the dequantized weights: the
    reference the engine must match. ``float_modules`` are stored as plain float weights (no
    scales) and named by ``rules`` (default: their names) in the form's list of modules not converted."""
    hf, tok = tiny_llama(tokenizer_dir, seed, **overrides)
    scale_name = "weight_scale_inv" if form == "block" else "weight_scale"
    tensors = {}
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("proj.weight") and name[: -len(".weight")] not in float_modules:
                q, s, deq = fp8_pack(p.data, form, block)
                p.copy_(deq)
                base = name[: -len(".weight")]
                tensors.update({f"{base}.weight": q, f"{base}.{scale_name}": s})
                if form == "tensor":  # a static activation scale, as the per-tensor releases ship
                    tensors[f"{base}.input_scale"] = torch.tensor(0.05)
            else:
                tensors[name] = p.data.clone()
    config = dict(QUANT_CONFIGS[form])
    if form == "block":
        config["weight_block_size"] = [block, block]
    if float_modules:
        key = IGNORE_KEYS[config["quant_method"]]
        config[key] = list(config.get(key, [])) + list(float_modules if rules is None else rules)
    save_model(hf, tok, tokenizer_dir, out_dir, tensors, config)
    return hf
