"""Helpers shared by the end-to-end tests (importable: pytest puts tests/e2e on sys.path)."""

from __future__ import annotations

import torch

from fp8_checkpoints import save_model, tiny_llama  # tests/fp8_checkpoints.py: a tiny Llama and its checkpoint
from int4_pack import awq_quantize, gptq_quantize  # noqa: F401  (tests/int4_pack.py: the reference packers)
from treadle.deploy.proc_tree import alive  # noqa: F401  (a zombie counts as gone)


def hf_greedy(hf, tok, prompt: str, n: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy tokens for ``prompt`` and their logprobs."""
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        want = hf.generate(ids, do_sample=False, max_new_tokens=n, attention_mask=torch.ones_like(ids))[0, ids.shape[1]:]
        logits = hf(torch.cat([ids[0], want]).unsqueeze(0)).logits[0, ids.shape[1] - 1:-1].float()
    return want.tolist(), torch.log_softmax(logits, -1).gather(1, want[:, None])[:, 0]


def engine_logprobs(out: dict) -> torch.Tensor:
    return torch.tensor([lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]])


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


def make_int4_model(out_dir: str, tokenizer_dir: str, quant: dict, seed: int = 0, hidden: int = 64,
                    dense: tuple[str, ...] = ()):
    """A tiny random Llama saved as a 4-bit checkpoint of ``quant`` (a ``quantization_config``:
    AWQ gemm, or GPTQ with its group_size, sym, desc_act, checkpoint_format); returns HF's
    float32 model holding the dequantized weights: the reference the engine must match.
    Projections whose names start with one of ``dense`` stay float (``quant`` should then name
    them in ``modules_to_not_convert``)."""
    hf, tok = tiny_llama(tokenizer_dir, seed, hidden_size=hidden, intermediate_size=2 * hidden)
    tensors, group = {}, quant["group_size"]
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if not name.endswith("proj.weight") or name.startswith(dense):
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
    save_model(hf, tok, tokenizer_dir, out_dir, tensors, quant)
    return hf
