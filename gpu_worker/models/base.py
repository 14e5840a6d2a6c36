"""What the model runner asks of a model class, declared once instead of probed with ``hasattr``.

``Model`` is the interface: a few capability flags the runner reads at start-up and the methods
it calls. ``ModelBase`` gives them their defaults (a decoder-only text model that loads whole
tensors and runs as a single pipeline stage); each model class states only what differs.
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterable, Optional, Protocol, Union

import torch
from torch import nn


class Model(Protocol):
    is_encoder: bool  # bidirectional: whole sequences each step through ``encode``, no KV cache
    supports_pp: bool  # builds only its pipeline stage's part (pp_size > 1)
    lazy_weights: bool  # load_weights takes loader.CheckpointTensors: each TP rank reads only its shard
    takes_images: bool  # has a vision tower: ``encode_images`` turns pixels into token embeddings
    scores_head: bool  # classification / reward head: encode reports raw class scores (no LM head)

    def __call__(self, input_ids: torch.Tensor, carry: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                 ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Final hidden states of the step's tokens (before the last pipeline stage: what to hand on)."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head: float32 logits of ``hidden``."""

    def wants_tensor(self, name: str) -> bool:
        """Whether this rank needs a checkpoint tensor; the loader reads no others."""

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> Any:
        """Copy the checkpoint's (HF-named) tensors into the parameters."""

    def encode(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """Encoders: last hidden states ``[len(row), hidden]`` of each complete sequence."""

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Multimodal models: vision embeddings ``[N, tokens, hidden]`` of images ``[N, 3, H, W]``."""


class ModelBase(nn.Module):
    """``Model`` with its defaults, the base of this package's model classes. The flags say which
    of the optional methods a class has; the others fail loudly if called anyway."""

    is_encoder: ClassVar[bool] = False
    supports_pp: ClassVar[bool] = False
    lazy_weights: bool = False  # an instance may follow a wrapped model (LLaVA's language model)
    takes_images: ClassVar[bool] = False
    scores_head: ClassVar[bool] = False

    def wants_tensor(self, name: str) -> bool:
        return True

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no LM head")

    def encode(self, rows: list[list[int]]) -> list[torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} is not an encoder")

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} takes text only")
