"""A decoder checkpoint without an LM head (Qwen3-Embedding-8B's bare, untied ``Qwen3Model``) is
refused for generation before any process starts, and accepted with ``is_embedding=True``."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from treadle.runtime.checkpoint_names import headless_error, tensor_names
from treadle.runtime.model_check import check_model
from treadle.runtime.server_args import ServerArgs

CFG = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 32, "hidden_size": 8,
       "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64}


def checkpoint(path, names: list[str], **cfg) -> str:
    os.makedirs(path, exist_ok=True)
    save_file({n: torch.zeros(2) for n in names}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**CFG, **cfg}, f)
    return str(path)


def test_names_come_from_the_file_headers(tmp_path):
    d = checkpoint(tmp_path / "m", ["embed_tokens.weight", "norm.weight"])
    assert tensor_names(d) == {"embed_tokens.weight", "norm.weight"}
    assert tensor_names(str(tmp_path)) is None


def test_headless_checkpoint_serves_embeddings_only(tmp_path):
    bare = checkpoint(tmp_path / "bare", ["embed_tokens.weight", "norm.weight"], tie_word_embeddings=False)
    assert "is_embedding=True" in headless_error(bare, {"tie_word_embeddings": False}, False)
    assert headless_error(bare, {"tie_word_embeddings": False}, True) == ""
    assert headless_error(bare, {"tie_word_embeddings": True}, False) == ""  # the head is the embedding
    with pytest.raises(ValueError, match="no LM head"):
        check_model(bare, ServerArgs(model_path=bare))
    check_model(bare, ServerArgs(model_path=bare, is_embedding=True))
    check_model(bare, ServerArgs(model_path=bare, load_format="dummy"))
    full = checkpoint(tmp_path / "full", ["model.embed_tokens.weight", "lm_head.weight"], tie_word_embeddings=False)
    check_model(full, ServerArgs(model_path=full))
