"""Helpers shared by the end-to-end tests (importable: pytest puts tests/e2e on sys.path)."""

from __future__ import annotations


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


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's "gemm" packing: nibble i of a word holds column 8c + AWQ_ORDER[i]


def awq_quantize(w, group: int):
    """``w`` [out, in] -> (qweight, qzeros, scales, dequantized [out, in]) in AutoAWQ's gemm layout,
    asymmetric 4-bit per group of ``group`` inputs. Written from the format's description, apart
    from the loader's code, so the test checks one against the other."""
    import torch

    wt = w.t().float()  # [in, out]
    n_in, n_out = wt.shape
    g = wt.reshape(n_in // group, group, n_out)
    lo, hi = g.amin(dim=1), g.amax(dim=1)  # [groups, out]
    scales = ((hi - lo).clamp(min=1e-5) / 15).half()
    zeros = torch.clamp(torch.round(-lo / scales.float()), 0, 15).to(torch.int32)
    q = torch.clamp(torch.round(g / scales.float()[:, None]) + zeros[:, None], 0, 15).to(torch.int32).reshape(n_in, n_out)
    deq = ((q.reshape(n_in // group, group, n_out) - zeros[:, None]).float() * scales.float()[:, None]).reshape(n_in, n_out)

    def pack(v):  # [r, out] ints 0..15 -> [r, out/8] int32
        words = torch.zeros(v.shape[0], v.shape[1] // 8, dtype=torch.int64)
        for i, col in enumerate(AWQ_ORDER):
            words |= v[:, col::8].to(torch.int64) << (4 * i)
        return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)

    return pack(q), pack(zeros), scales, deq.t().contiguous()


def make_awq_model(out_dir: str, tokenizer_dir: str, seed: int = 0, group: int = 32):
    """A tiny random Llama saved as an AWQ (gemm, 4-bit) checkpoint; returns HF's float32 model
    holding the dequantized weights: the reference the engine must match."""
    import glob
    import json
    import os
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.1, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(cfg).eval()
    tensors = {}
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("proj.weight"):
                qw, qz, sc, deq = awq_quantize(p.data, group)
                p.copy_(deq)
                base = name[: -len(".weight")]
                tensors.update({f"{base}.qweight": qw, f"{base}.qzeros": qz, f"{base}.scales": sc})
            else:
                tensors[name] = p.data.clone()
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "model.safetensors"))
    d = cfg.to_dict()
    d["architectures"] = ["LlamaForCausalLM"]
    d["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                "version": "gemm"}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(d, f)
    tok.save_pretrained(out_dir)
    for extra in glob.glob(os.path.join(tokenizer_dir, "*.jinja")):
        shutil.copy(extra, out_dir)
    return hf
