"""Helpers shared by the end-to-end tests (importable: pytest puts tests/e2e on sys.path)."""

from __future__ import annotations

from int4_pack import awq_quantize, gptq_quantize  # noqa: F401  (tests/int4_pack.py: the reference packers)


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (a reaped-later child counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def make_peft_adapter(base_dir: str, out_dir: str, rank: int, alpha: int, targets: list[str], seed: int,
                      rslora: bool = False, b_scale: float = 0.3) -> None:
    """Save a PEFT LoRA adapter for the model in ``base_dir`` with random A and B (peft's own
    init leaves B at zero, a no-op adapter); ``b_scale`` keeps the changed text peaked."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, init_lora_weights=False)
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(b_scale)
    model.save_pretrained(out_dir)


def make_awq_model(out_dir: str, tokenizer_dir: str, seed: int = 0, group: int = 32):
    """A tiny random Llama saved as an AWQ (gemm, 4-bit) checkpoint; returns HF's float32 model
    holding the dequantized weights: the reference the engine must match."""
    return make_int4_model(out_dir, tokenizer_dir, {"quant_method": "awq", "bits": 4, "group_size": group,
                                                    "zero_point": True, "version": "gemm"}, seed)


def _input_of(name: str) -> int:
    """A seed per projection input: q/k/v share one, gate/up one (GPTQ's act order follows the input)."""
    layer = int(name.split(".")[2])
    proj = name.split(".")[-2]
    return 4 * layer + {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 2, "up_proj": 2}.get(proj, 3)


def make_int4_model(out_dir: str, tokenizer_dir: str, quant: dict, seed: int = 0, hidden: int = 64):
    """A tiny random Llama saved as a 4-bit checkpoint of ``quant`` (a ``quantization_config``:
    AWQ gemm, or GPTQ with its group_size, sym, desc_act, checkpoint_format); returns HF's
    float32 model holding the dequantized weights: the reference the engine must match."""
    import glob
    import json
    import os
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.1, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(cfg).eval()
    tensors, group = {}, quant["group_size"]
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if not name.endswith("proj.weight"):
                tensors[name] = p.data.clone()
                continue
            base = name[: -len(".weight")]
            if quant["quant_method"] == "awq":
                qw, qz, sc, deq = awq_quantize(p.data, group)
            else:
                qw, qz, sc, g_idx, deq = gptq_quantize(p.data, group, quant.get("sym", True), quant.get("desc_act", False),
                                                       quant.get("checkpoint_format") == "gptq_v2", seed=_input_of(name))
                tensors[f"{base}.g_idx"] = g_idx
            p.copy_(deq)
            tensors.update({f"{base}.qweight": qw, f"{base}.qzeros": qz, f"{base}.scales": sc})
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "model.safetensors"))
    d = cfg.to_dict()
    d["architectures"] = ["LlamaForCausalLM"]
    d["quantization_config"] = quant
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(d, f)
    tok.save_pretrained(out_dir)
    for extra in glob.glob(os.path.join(tokenizer_dir, "*.jinja")):
        shutil.copy(extra, out_dir)
    return hf
