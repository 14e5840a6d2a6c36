"""Qwen3 (dense): the Llama decoder with an RMSNorm over each head of q and k before RoPE, no
q/k/v bias (unless ``attention_bias``), ``head_dim`` from the config (not hidden / heads).

Qwen3-Embedding ships the bare ``Qwen3Model`` (names without ``model.``, the 8B without an LM
head) under ``architectures: ["Qwen3ForCausalLM"]``; ``LlamaForCausalLM.load_weights`` takes both
layouts, and with ``is_embedding=True`` the engine serves the last token's final hidden state,
L2-normalized (gpu_worker/pooling.py's default for decoders).
"""

from __future__ import annotations

from treadle.gpu_worker.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True


class Qwen3Model(Qwen3ForCausalLM):
    """A config naming the bare backbone (embedding checkpoints): the same model."""
