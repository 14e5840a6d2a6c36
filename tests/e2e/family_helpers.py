"""Tiny random-weight models of the model families, built with transformers' own classes, and
HF's greedy tokens and logprobs on them: the references the family tests compare the engine to."""

from __future__ import annotations

import glob
import os
import shutil
from typing import Any

import torch

# The shapes every family shares: several layers, GQA (4 query heads over 2 KV heads), hidden 64.
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.12, tie_word_embeddings=False)


def save_tiny(config_cls: Any, model_cls: Any, out_dir: str, tokenizer_dir: str, seed: int = 0,
              **overrides: Any) -> Any:
    """Save a random ``model_cls(config_cls(...))`` (safetensors) with the tokenizer beside it;
    returns the float32 HF model, the reference."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    kw = dict(SHAPE, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.eos_token_id)
    kw.update(overrides)
    cfg = config_cls(**kw)
    torch.manual_seed(seed)
    hf = model_cls(cfg).eval()
    hf.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    for extra in glob.glob(os.path.join(tokenizer_dir, "*.jinja")):
        shutil.copy(extra, out_dir)
    return hf


@torch.no_grad()
def hf_greedy(hf: Any, prompts: list[list[int]], new_tokens: int) -> list[tuple[list[int], torch.Tensor]]:
    """Per prompt: HF ``generate``'s greedy tokens (EOS ignored; all prompts in one left-padded
    batch, several times faster than one call each) and the log-softmax of HF's logits over the
    whole unpadded sequence (row p: the distribution of token p + 1)."""
    hf.generation_config.eos_token_id = None
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    gen = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    out = []
    for p, row in zip(prompts, gen[:, width:].tolist()):
        logits = hf(torch.tensor([p + row])).logits[0].float()
        out.append((row, torch.log_softmax(logits, dim=-1)))
    return out


def check_result(res: dict, ids: list[int], want: list[int], ref: torch.Tensor, inputs: bool,
                 tol: float = 1e-4) -> None:
    """The engine's result equals HF's tokens; its output (and with ``inputs`` prompt) logprobs
    are HF's within ``tol``."""
    assert res["output_ids"] == want
    meta = res["meta_info"]
    for k, (lp, tok, _) in enumerate(meta["output_token_logprobs"]):
        assert tok == want[k] and abs(lp - ref[len(ids) - 1 + k, tok].item()) < tol, (k, lp)
    assert len(meta["output_token_logprobs"]) == len(want)
    if inputs:
        inp = meta["input_token_logprobs"]
        assert len(inp) == len(ids) and inp[0][0] is None
        for p in range(1, len(ids)):
            assert inp[p][1] == ids[p] and abs(inp[p][0] - ref[p - 1, ids[p]].item()) < tol, (p, inp[p])
