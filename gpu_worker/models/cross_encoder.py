"""Cross-encoder heads on the BERT encoder: ``BertForSequenceClassification`` and
``XLMRobertaForSequenceClassification`` (rerankers such as ms-marco MiniLM or bge-reranker),
served by ``rerank`` and ``encode`` as scores.

``encode`` returns, per sequence, its class scores as a one-row tensor (the runner's CLS pooling
takes it as is, unnormalized). Activation as SGLang's cross-encoders: the checkpoint's
``sbert_ce_default_activation_function`` (or ``sentence_transformers.activation_fn``) when it
names one, else the raw logits.

A [query, document] pair arrives as one token row, ``[CLS] q [SEP] d [SEP]``, without its
segment ids (the wire carries token ids only). They are derived here as BERT's tokenizer makes
them for a pair: 0 up to and including the first ``[SEP]``, 1 after it (a single text has nothing
after its one ``[SEP]``, so it stays all 0). XLM-R has a single segment and needs none.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from treadle.gpu_worker.loader import default_weight_loader
from treadle.gpu_worker.models.bert import BertModel

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "torch.nn.modules.activation.Sigmoid": torch.sigmoid,
    "torch.nn.modules.activation.Tanh": torch.tanh,
    "torch.nn.modules.linear.Identity": lambda x: x,
}


def score_activation(config) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation the checkpoint declares for its scores (identity when it declares none)."""
    st = getattr(config, "sentence_transformers", None)
    name = (st or {}).get("activation_fn") if isinstance(st, dict) else None
    name = name or getattr(config, "sbert_ce_default_activation_function", None)
    if name is None:
        return _ACTIVATIONS["torch.nn.modules.linear.Identity"]
    if name not in _ACTIVATIONS:
        raise ValueError(f"sbert_ce_default_activation_function {name!r} is not supported; "
                         f"supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def sep_token_id(config) -> int:
    """The ``[SEP]`` id: the config's, else that of the tokenizer beside the checkpoint."""
    sep = getattr(config, "sep_token_id", None)
    model_dir = getattr(config, "name_or_path", "") or ""
    if sep is None and os.path.exists(os.path.join(model_dir, "tokenizer_config.json")):
        from transformers import AutoTokenizer

        sep = AutoTokenizer.from_pretrained(model_dir).sep_token_id
    if sep is None:
        raise ValueError(f"cannot find the [SEP] token id of {model_dir!r} (needed for the segment ids of pairs)")
    return int(sep)


def pair_token_types(row: list[int], sep: int) -> list[int]:
    """Segment ids of a row: 0 through the first ``sep``, 1 after it."""
    first = row.index(sep) if sep in row else len(row)
    return [0] * (first + 1) + [1] * (len(row) - first - 1) if first < len(row) else [0] * len(row)


class BertForSequenceClassification(BertModel):
    scores_head = True

    def __init__(self, config, max_positions: int = 512) -> None:
        super().__init__(config, max_positions)
        h = config.hidden_size
        self.pooler = nn.Linear(h, h)  # BERT's pooler: dense + tanh on the [CLS] state
        self.classifier = nn.Linear(h, config.num_labels)
        self.activation = score_activation(config)
        self.sep = sep_token_id(config) if config.type_vocab_size > 1 else None

    def head(self, cls: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.pooler(cls)))

    def encode(self, rows: list[list[int]], token_types: Optional[list[list[int]]] = None) -> list[torch.Tensor]:
        """Each sequence's activated class scores ``[1, num_labels]`` (float32)."""
        if token_types is None and self.sep is not None:
            token_types = [pair_token_types(r, self.sep) for r in rows]
        hidden = super().encode(rows, token_types)
        scores = self.activation(self.head(torch.stack([h[0] for h in hidden])).float())
        return list(scores[:, None, :])

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The encoder's tensors go to BERT's loader; the head's are copied here."""
        params = dict(self.named_parameters())
        seen: set[str] = set()

        def encoder_tensors():
            for name, w in weights:
                ours = self.head_param(name)
                if ours is None:
                    yield name, w
                    continue
                if ours not in params:
                    raise ValueError(f"unexpected {type(self).__name__} weight {name!r}")
                default_weight_loader(params[ours], w)
                seen.add(ours)

        super().load_weights(encoder_tensors())
        missing = {n for n in params if n.startswith(("pooler.", "classifier.")) and n not in seen}
        if missing:
            raise ValueError(f"checkpoint lacks the classification head's {sorted(missing)}")

    @staticmethod
    def head_param(name: str) -> Optional[str]:
        """This model's name of a head tensor (None: an encoder tensor)."""
        name = name.removeprefix("bert.")
        if name.startswith("pooler.dense."):
            return "pooler." + name[len("pooler.dense."):]
        return name if name.startswith("classifier.") else None


class XLMRobertaForSequenceClassification(BertForSequenceClassification):
    """RoBERTa's head reads the ``<s>`` state through dense + tanh + out_proj; positions start at
    ``pad_token_id + 1``."""

    def __init__(self, config, max_positions: int = 512) -> None:
        super().__init__(config, max_positions)
        self.position_offset = config.pad_token_id + 1
        h = config.hidden_size
        del self.pooler
        self.classifier = nn.ModuleDict({"dense": nn.Linear(h, h), "out_proj": nn.Linear(h, config.num_labels)})

    def head(self, cls: torch.Tensor) -> torch.Tensor:
        return self.classifier["out_proj"](torch.tanh(self.classifier["dense"](cls)))

    @staticmethod
    def head_param(name: str) -> Optional[str]:
        return name if name.startswith("classifier.") else None
