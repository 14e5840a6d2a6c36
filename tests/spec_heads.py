"""Tiny random EAGLE / EAGLE3 draft heads for the default model (hidden size 576), written as the
published checkpoints are laid out: one safetensors file and a Llama ``config.json`` naming the
head's architecture (``LlamaForCausalLMEagle`` / ``LlamaForCausalLMEagle3``)."""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from safetensors.torch import save_file

HEAD = dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64, intermediate_size=128,
            num_hidden_layers=1, rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
            vocab_size=49152, hidden_act="silu", model_type="llama", tie_word_embeddings=False)
DRAFT_VOCAB = 4096  # EAGLE3's reduced vocabulary: 4,096 ids of a shuffled target vocabulary


def make_eagle_head(out_dir: str, eagle3: bool, seed: int = 0, std: float = 0.1, draft_vocab: int = DRAFT_VOCAB,
                    aux_layers: Optional[list[int]] = None, echo: Optional[torch.Tensor] = None,
                    embed: Optional[torch.Tensor] = None, **shape: object) -> str:
    """Write a random head to ``out_dir`` (EAGLE: ``fc`` with bias over [embedding, hidden] and
    ``layers.0`` without an input norm; EAGLE3: ``fc`` over three hidden states, ``midlayer`` with
    ``hidden_norm``, ``norm``, its own ``lm_head`` over ``draft_vocab`` ids and ``d2t``). ``shape``
    overrides ``HEAD`` (a smaller target's sizes); ``aux_layers``: EAGLE3's
    ``eagle_aux_hidden_state_layer_ids`` (None: the default layers).

    ``echo``: the target's (tied) embedding ``[V, H]``; the head then drafts tokens it has seen, so
    some drafts are accepted: ``fc`` passes an embedding through (EAGLE: the last token's, so it
    drafts that token again; EAGLE3, whose first aux layer must be -1: the embedding tap, the token
    before the last, so it drafts period-2 patterns; the deeper taps, hundreds of times larger, add a
    small share), the layer (weights of ``std``) only perturbs
    it, and the LM head (EAGLE3's: the echo rows of its draft ids, which keep the 600 lowest ids)
    scores tokens by their embedding.

    ``embed``: the head's own ``embed_tokens.weight`` ``[V, H]`` (some checkpoints carry one; the
    head reads it instead of the target's unless it is a copy of the target's)."""
    cfg = {**HEAD, **shape}
    g = torch.Generator().manual_seed(seed)
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]

    def w(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=g) * std

    layer = "midlayer." if eagle3 else "layers.0."
    t = {layer + "self_attn.q_proj.weight": w(q, 2 * h if eagle3 else h),
         layer + "self_attn.k_proj.weight": w(kv, 2 * h if eagle3 else h),
         layer + "self_attn.v_proj.weight": w(kv, 2 * h if eagle3 else h),
         layer + "self_attn.o_proj.weight": w(h, q),
         layer + "mlp.gate_proj.weight": w(inter, h), layer + "mlp.up_proj.weight": w(inter, h),
         layer + "mlp.down_proj.weight": w(h, inter),
         layer + "post_attention_layernorm.weight": torch.ones(h)}
    if eagle3:
        ids = torch.randperm(cfg["vocab_size"], generator=g)[:draft_vocab].sort().values
        if echo is not None:  # the common (low) ids and a random rest
            ids = torch.cat([torch.arange(600), 600 + torch.randperm(cfg["vocab_size"] - 600, generator=g)
                             [:draft_vocab - 600]]).sort().values
        t.update({layer + "input_layernorm.weight": torch.ones(h), layer + "hidden_norm.weight": torch.ones(h),
                  "fc.weight": w(h, 3 * h), "norm.weight": torch.ones(h), "lm_head.weight": w(draft_vocab, h),
                  "d2t": ids - torch.arange(draft_vocab), "t2d": torch.zeros(cfg["vocab_size"], dtype=torch.bool)})
        cfg.update(architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=draft_vocab)
        if aux_layers is not None:
            cfg["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": aux_layers}
    else:
        t.update({"fc.weight": w(h, 2 * h), "fc.bias": w(h)})
        cfg.update(architectures=["LlamaForCausalLMEagle"])
    if echo is not None:
        rest = (w(h, h) * 0.02, w(h, h) * 0.006) if eagle3 else (torch.zeros(h, h),)  # EAGLE3: deep taps nudge it
        t["fc.weight"] = torch.cat([torch.eye(h), *rest], dim=1)
        if eagle3:
            t["lm_head.weight"] = echo[ids]
        else:
            t["fc.bias"] = torch.zeros(h)
    if embed is not None:
        t["embed_tokens.weight"] = embed
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f)
    return out_dir
