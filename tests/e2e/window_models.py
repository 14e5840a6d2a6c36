"""Tiny random-weight models with sliding windows shorter than the test prompts, built with
transformers' own config and model classes (float32, eager attention: Gemma 2's soft-capping
needs it in HF), saved as safetensors beside the default model's tokenizer."""

from __future__ import annotations

import glob
import os
import shutil
from contextlib import contextmanager

import torch

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.15, rms_norm_eps=1e-6)


def _configs(tok):
    from transformers import Gemma2Config, MistralConfig
    from transformers.models.gemma3 import Gemma3TextConfig

    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.eos_token_id)
    return {
        # window 8, logits and attention scores soft-capped hard enough to matter
        "gemma2": lambda: Gemma2Config(**COMMON, **ids, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                                       attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                       tie_word_embeddings=True),
        # one global layer of four, local and (linearly scaled) global RoPE bases, q/k norms
        "gemma3": lambda: Gemma3TextConfig(
            **COMMON, **ids, head_dim=16, sliding_window=12, query_pre_attn_scalar=16, final_logit_softcapping=3.0,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0}},
            tie_word_embeddings=True),
        "mistral": lambda: MistralConfig(**COMMON, **ids, sliding_window=10, tie_word_embeddings=False),
    }


def make_window_model(family: str, out_dir: str, tokenizer_dir: str, seed: int = 0):
    """Save a tiny ``family`` model to ``out_dir``; returns HF's float32 model (the reference).
    Norm gains are random too (HF starts Gemma's at 0), so ``(1 + w)`` is checked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = _configs(tok)[family]()
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager").eval()
    _spread_norms_and_save(hf, tok, out_dir)
    for extra in glob.glob(os.path.join(tokenizer_dir, "*.jinja")):
        shutil.copy(extra, out_dir)
    return hf


def _spread_norms_and_save(hf, tok, out_dir: str) -> None:
    """Norm gains drawn around 0 (Gemma's ``(1 + w)`` would hide a missing offset at w = 0), then
    the model and tokenizer saved as transformers saves them."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    hf.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)


@contextmanager
def one_thread():
    """Tiny models in this process on one thread: ~10x faster than two on a busy 2-core machine
    (each op is too small to split, and the threads wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def hf_greedy_and_logprobs(hf, ids: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """HF ``generate``'s greedy tokens, and the log-probabilities of every token of prompt + output
    after the first (teacher-forced, one forward over the whole sequence)."""
    x = torch.tensor([ids])
    with one_thread(), torch.no_grad():
        out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens,
                          min_new_tokens=max_new_tokens)[0, len(ids):].tolist()
        full = torch.tensor([ids + out])
        logp = torch.log_softmax(hf(full).logits[0, :-1].float(), -1).gather(1, full[0, 1:, None])[:, 0]
    return out, logp


def make_gemma3_multimodal(out_dir: str, tokenizer_dir: str, seed: int = 0):
    """A tiny ``Gemma3ForConditionalGeneration`` (SigLIP tower, projector, Gemma 3 text model
    with a window of 8) saved as transformers saves it; returns HF's float32 model."""
    from transformers import AutoTokenizer, Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig
    from transformers.models.gemma3 import Gemma3TextConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = Gemma3TextConfig(**{**COMMON, "num_hidden_layers": 2}, vocab_size=len(tok), head_dim=16, sliding_window=8,
                            query_pre_attn_scalar=16, final_logit_softcapping=3.0,
                            layer_types=["sliding_attention", "full_attention"])
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    n = len(tok)
    cfg = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                       image_token_index=n - 1, boi_token_index=n - 3, eoi_token_index=n - 2)
    torch.manual_seed(seed)
    hf = Gemma3ForConditionalGeneration(cfg).eval()
    _spread_norms_and_save(hf, tok, out_dir)
    return hf
