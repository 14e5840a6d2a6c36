"""Decoder classification and reward heads: ``LlamaForSequenceClassification`` (and its Mistral /
Qwen2 twins) and ``Qwen2ForRewardModel``, served by ``encode`` as scores.

The decoder stack is the Llama family's, unchanged; the LM head is replaced by a small score head
applied to every final hidden state, so ``forward`` returns per-token scores ``[T, num_labels]``.
An ``encode`` request reports its last position's row (the runner's hidden-state path), never
normalized: the last-token pooling of HF's and SGLang's classification models. The head is a few
thousand weights, replicated on every TP rank (the hidden states it reads are already reduced).
"""

from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
from torch import nn

from treadle.gpu_worker.models.llama import LlamaForCausalLM


class LlamaForSequenceClassification(LlamaForCausalLM):
    scores_head = True

    def __init__(self, config, max_positions: Optional[int] = None):
        super().__init__(config, max_positions)
        self.lm_head = None  # no vocabulary projection: the score head replaces it
        self.tied = False  # a tied LM head, if the config says so, is not part of a classifier
        self.score = self.build_head(config)

    @staticmethod
    def build_head(config) -> nn.Module:
        return nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def forward(self, input_ids: torch.Tensor, carry: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Per-token scores ``[T, num_labels]`` (before the last pipeline stage: what to hand on)."""
        hidden = self.model(input_ids, carry)
        return hidden if isinstance(hidden, tuple) else self.score(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} scores sequences (encode); it generates no tokens")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], complete: bool = True) -> set[str]:
        return super().load_weights(((n, t) for n, t in weights if not n.startswith("lm_head.")), complete)

    def wants_tensor(self, name: str) -> bool:
        return not name.startswith("lm_head.") and super().wants_tensor(name)


class MistralForSequenceClassification(LlamaForSequenceClassification):
    pass


class Qwen2ForSequenceClassification(LlamaForSequenceClassification):
    qkv_bias, o_bias = True, False


class Qwen2ForRewardModel(Qwen2ForSequenceClassification):
    """Qwen2.5-Math-RM's head (remote code in its checkpoint): Linear, ReLU, Linear to one score."""

    @staticmethod
    def build_head(config) -> nn.Module:
        h = config.hidden_size
        return nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))
