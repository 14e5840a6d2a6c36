"""Tiny random classification / reward / cross-encoder checkpoints for tests, built with
transformers' own classes and ``save_pretrained`` (safetensors, float32), a tokenizer beside each.

Each builder returns ``(directory, reference)``: ``reference(ids) -> list[float]`` is transformers'
score of one token sequence (float32, CPU), what the engine must match.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

Reference = Callable[[list[int]], list[float]]


def _small(cfg_cls, vocab_size: int, **extra):
    return cfg_cls(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                   initializer_range=0.1, tie_word_embeddings=False, pad_token_id=None, **extra)


def build_llama_classifier(path: str, tokenizer_dir: str, num_labels: int = 3, seed: int = 0) -> tuple[str, Reference]:
    """``LlamaForSequenceClassification`` with ``num_labels`` classes (last-token pooling)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(_small(LlamaConfig, len(tok), num_labels=num_labels)).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)

    @torch.no_grad()
    def reference(ids: list[int]) -> list[float]:
        return model(torch.tensor([ids])).logits[0].tolist()
    return path, reference


def build_qwen2_reward(path: str, tokenizer_dir: str, seed: int = 0) -> tuple[str, Reference]:
    """A ``Qwen2ForRewardModel`` checkpoint (Qwen2.5-Math-RM's layout: ``model.*`` and the head
    ``score.0`` / ``score.2``). transformers has no class for it (it is remote code), so the
    reference is its Qwen2Model and the same head in torch."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen2Config, Qwen2Model

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = _small(Qwen2Config, len(tok), num_labels=1)
    cfg.architectures = ["Qwen2ForRewardModel"]
    torch.manual_seed(seed)
    body = Qwen2Model(cfg).eval()
    head = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    torch.nn.init.normal_(head[0].weight, std=0.1), torch.nn.init.normal_(head[2].weight, std=0.1)
    tensors = {f"model.{k}": v for k, v in body.state_dict().items() if "rotary_emb" not in k}
    tensors.update({f"score.{k}": v for k, v in head.state_dict().items()})
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    cfg.save_pretrained(path)
    tok.save_pretrained(path)

    @torch.no_grad()
    def reference(ids: list[int]) -> list[float]:
        return head(body(torch.tensor([ids])).last_hidden_state[0, -1]).tolist()
    return path, reference


def build_cross_encoder(path: str, tokenizer_dir: str, kind: str = "bert", seed: int = 0,
                        **config_extra) -> tuple[str, Callable[[list[int], list[int]], list[float]]]:
    """``BertForSequenceClassification`` (two segments) or ``XLMRobertaForSequenceClassification``
    with one label, on a BERT WordPiece tokenizer. The reference takes ids and segment ids (the
    tokenizer's own ``token_type_ids`` of the pair)."""
    from transformers import (AutoTokenizer, BertConfig, BertForSequenceClassification, XLMRobertaConfig,
                              XLMRobertaForSequenceClassification)

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, initializer_range=0.1, num_labels=1, **config_extra)
    if kind == "bert":
        cfg, cls = BertConfig(max_position_embeddings=512, type_vocab_size=2, **common), BertForSequenceClassification
    else:
        cfg = XLMRobertaConfig(max_position_embeddings=514, type_vocab_size=1, pad_token_id=tok.pad_token_id,
                               **common)
        cls = XLMRobertaForSequenceClassification
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)

    @torch.no_grad()
    def reference(ids: list[int], types: list[int]) -> list[float]:
        types = types if kind == "bert" else [0] * len(ids)  # XLM-R has one segment
        out = model(torch.tensor([ids]), token_type_ids=torch.tensor([types])).logits[0]
        name = getattr(cfg, "sbert_ce_default_activation_function", None)
        return (torch.sigmoid(out) if name and name.endswith("Sigmoid") else out).tolist()
    return path, reference
