"""BERT encoder (BertModel: bge, all-MiniLM, e5...) for embeddings.

Bidirectional attention over whole sequences, so it keeps no KV cache: the runner hands it
the rows of a step as complete sequences and pools the last hidden states (gpu_worker/pooling.py).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from treadle.gpu_worker.distributed import tp_size
from treadle.gpu_worker.models.base import ModelBase


class BertLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float, act: str) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.up = nn.Linear(hidden, intermediate)
        self.down = nn.Linear(intermediate, hidden)
        self.out_norm = nn.LayerNorm(hidden, eps=eps)
        self.act = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh")}[act]

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # no causal mask: every token sees all
        x = self.attn_norm(x + self.attn_out(a.transpose(1, 2).reshape(b, t, h)))
        return self.out_norm(x + self.down(self.act(self.up(x))))


class BertModel(ModelBase):
    is_encoder = True
    position_offset = 0  # RoBERTa / XLM-R count positions from padding_idx + 1

    def __init__(self, config, max_positions: int = 512) -> None:
        super().__init__()
        if tp_size() > 1:
            raise ValueError("BERT embedding models run with tp_size=1 (they are small); use dp_size to scale.")
        h = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, h)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, h)
        self.emb_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(
            BertLayer(h, config.num_attention_heads, config.intermediate_size, config.layer_norm_eps, config.hidden_act)
            for _ in range(config.num_hidden_layers))

    def encode(self, rows: list[list[int]], token_types: Optional[list[list[int]]] = None) -> list[torch.Tensor]:
        """Last hidden states ``[len(row), hidden]`` of each complete sequence (one padded batch);
        ``token_types``: each row's segment ids (default all 0, a single text)."""
        dev = self.word_embeddings.weight.device
        t = max(map(len, rows))
        ids = torch.zeros(len(rows), t, dtype=torch.int64)
        types = torch.zeros(len(rows), t, dtype=torch.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            if token_types is not None:
                types[i, : len(r)] = torch.tensor(token_types[i])
        ids, types = ids.to(dev), types.to(dev)
        lens = torch.tensor([len(r) for r in rows], device=dev)
        valid = torch.arange(t, device=dev)[None, :] < lens[:, None]
        pos = torch.arange(t, device=dev)[None, :] + self.position_offset
        x = self.emb_norm(self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings(types))
        mask = valid[:, None, None, :]  # padding keys are hidden from every query
        for layer in self.layers:
            x = layer(x, mask)
        return [x[i, : len(r)] for i, r in enumerate(rows)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        qkv: dict[str, dict[str, torch.Tensor]] = {}
        rename = {"embeddings.LayerNorm": "emb_norm", "attention.output.dense": "attn_out",
                  "attention.output.LayerNorm": "attn_norm", "intermediate.dense": "up", "output.dense": "down",
                  "output.LayerNorm": "out_norm"}
        for name, w in weights:
            name = name.removeprefix("bert.").removeprefix("roberta.").removeprefix("model.")
            if name.startswith(("pooler.", "cls.")) or name.endswith("position_ids"):
                continue  # the pooler head is not part of sentence embeddings
            name = name.replace("embeddings.word_embeddings", "word_embeddings").replace(
                "embeddings.position_embeddings", "position_embeddings").replace(
                "embeddings.token_type_embeddings", "token_type_embeddings").replace("encoder.layer.", "layers.")
            for hf, ours in rename.items():
                name = name.replace(hf, ours)
            for part in ("query", "key", "value"):
                tag = f".attention.self.{part}."
                if tag in name:
                    prefix, kind = name.split(tag)
                    qkv.setdefault(f"{prefix}.qkv.{kind}", {})[part] = w
                    break
            else:
                if name not in params:
                    raise ValueError(f"unexpected BERT weight {name!r}")
                params[name].data.copy_(w)
        for name, parts in qkv.items():
            params[name].data.copy_(torch.cat([parts["query"], parts["key"], parts["value"]], dim=0))
