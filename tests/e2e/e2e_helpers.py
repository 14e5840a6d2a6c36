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
