"""Gemma 3 text models: Gemma 2's blocks (``gemma2.py``) plus q/k norms and two RoPE tables.

Sliding layers (``layer_types``, every sixth layer global in the released models) rotate with the
local base (``rope_local_base_freq``, 10k), global layers with ``rope_theta`` and its scaling.
transformers' Gemma 3 does not apply ``attn_logit_softcapping`` (only the final soft-cap), so
neither does this. ``Gemma3ForConditionalGeneration`` checkpoints serve their language model
(text only): the vision tower's and projector's tensors are not read, and (as in transformers'
class) the final logits are not soft-capped.
"""

from __future__ import annotations

from typing import Optional

from treadle.gpu_worker.layers.rotary import RotaryEmbedding, rope_parameters
from treadle.gpu_worker.models.gemma2 import Gemma2ForCausalLM
from treadle.gpu_worker.models.llama import head_dim_of


def rope_by_layer_type(config) -> dict[str, dict]:
    """``{"sliding_attention": params, "full_attention": params}``: transformers 5 keeps them in
    ``rope_parameters`` by layer type; older configs give ``rope_theta`` (+ ``rope_scaling``) for
    the global layers and ``rope_local_base_freq`` for the local ones."""
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params or "sliding_attention" in params:
        return {t: {**p, "rope_type": p.get("rope_type", p.get("type", "default"))} for t, p in params.items() if p}
    full = rope_parameters(config)
    local = {"rope_type": "default", "rope_theta": getattr(config, "rope_local_base_freq", 10000.0)}
    return {"full_attention": full, "sliding_attention": local}


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    qk_norm = True
    attn_softcap = False

    def __init__(self, config, max_positions: Optional[int] = None):
        if getattr(config, "use_bidirectional_attention", False):
            raise NotImplementedError("Gemma 3 with use_bidirectional_attention=True (EmbeddingGemma) is not built: "
                                      "its attention is not causal")
        super().__init__(config, max_positions)

    @staticmethod
    def rotaries(config, positions: int) -> dict[str, RotaryEmbedding]:
        hd = head_dim_of(config)
        return {t: RotaryEmbedding(hd, positions, p) for t, p in rope_by_layer_type(config).items()}


class Gemma3ForConditionalGeneration(Gemma3ForCausalLM):
    """The language model of a multimodal Gemma 3 checkpoint, text only. Its tensors sit under
    ``model.language_model.`` (transformers 5) or ``language_model.model.`` (older saves)."""

    PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                ("language_model.lm_head.", "lm_head."))

    TEXT = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")  # names already the text model's

    def __init__(self, config, max_positions: Optional[int] = None):
        text = getattr(config, "text_config", None) or config
        text.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        super().__init__(text, max_positions)
        self.final_cap = None  # transformers soft-caps the final logits in Gemma3ForCausalLM only

    @classmethod
    def text_name(cls, name: str) -> Optional[str]:
        """The text model's name of a checkpoint tensor (None: a vision tensor)."""
        for old, new in cls.PREFIXES:
            if name.startswith(old):
                return new + name[len(old):]
        return name if name.startswith(cls.TEXT) else None

    def wants_tensor(self, name: str) -> bool:
        text = self.text_name(name)
        return text is not None and super().wants_tensor(text)

    def load_weights(self, weights, complete: bool = True) -> set[str]:
        return super().load_weights(((self.text_name(n), t) for n, t in weights if self.text_name(n)), complete)
