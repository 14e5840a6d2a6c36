"""The original LLaVA layout (``LlavaLlamaForCausalLM``, ``liuhaotian/llava-v1.5-*``) on the HF
LLaVA model: only checkpoint names differ (runtime/llava_layout.py maps the config).

The checkpoint holds the language model (``model.*``, ``lm_head.*``) and the projector
(``model.mm_projector.0`` / ``.2``, the two linears around the GELU); the vision tower's weights
come from the CLIP checkpoint ``mm_vision_tower`` names (``vision_model.*``; a full CLIPModel's
text half is skipped), read after the main checkpoint.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Optional

import torch

from treadle.gpu_worker.loader import iter_safetensors
from treadle.gpu_worker.models.llava import LlavaForConditionalGeneration

_RENAMES = (("model.mm_projector.0.", "multi_modal_projector.linear_1."),
            ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
            ("model.vision_tower.vision_tower.", "vision_tower."),  # a checkpoint that trained the tower
            ("lm_head.", "language_model.lm_head."),
            ("model.", "language_model.model."))


def hf_name(name: str) -> str:
    """A checkpoint tensor's name in the HF LLaVA layout (``models/llava.checkpoint_name`` reads it)."""
    for old, new in _RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


class LlavaLlamaForCausalLM(LlavaForConditionalGeneration):
    def __init__(self, config, max_positions: Optional[int] = None):
        super().__init__(config, max_positions)
        self.tower_dir = config.vision_tower_dir

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The checkpoint's tensors (renamed), then the vision tower's from its own checkpoint
        (unless the first brought them)."""
        seen: set[str] = set()

        def renamed():
            for name, t in weights:
                name = hf_name(name)
                seen.add(name)
                yield name, t

        def tower():
            if any(n.startswith("vision_tower.") for n in seen) or self.vision_tower is None:
                return
            keep = lambda n: n.startswith("vision_model.") and self.wants_tensor("vision_tower." + n)  # noqa: E731
            for name, t in iter_safetensors(self.tower_dir, keep=keep, lazy=self.lazy_weights):
                yield "vision_tower." + name, t

        return super().load_weights(itertools.chain(renamed(), tower()))

    def wants_tensor(self, name: str) -> bool:
        return super().wants_tensor(hf_name(name))
