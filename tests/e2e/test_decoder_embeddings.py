"""Decoder embedding models in Qwen3-Embedding's layout: a bare ``Qwen3Model`` checkpoint (names
without ``model.``, untied and without an LM head, like Qwen3-Embedding-8B) under
``architectures: ["Qwen3ForCausalLM"]``, served with ``is_embedding=True``: the last token's final
hidden state, L2-normalized, equals HF's; ``dimensions`` cuts it (Matryoshka) before normalizing."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from family_helpers import save_tiny
from treadle import Engine

pytestmark = pytest.mark.e2e

TEXTS = ["What is the capital of France?", "def add(a, b): return a + b", "Once upon a time",
         "The three primary colors are red, yellow and blue."]


@pytest.fixture(scope="module")
def embedder(tmp_path_factory, default_model_dir, hf_tokenizer):
    from transformers import Qwen3Config, Qwen3Model

    path = str(tmp_path_factory.mktemp("qwen3_embedding"))
    hf = save_tiny(Qwen3Config, Qwen3Model, path, default_model_dir, head_dim=32)
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "embed_tokens.weight" in names and not any(n.startswith(("model.", "lm_head")) for n in names)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(architectures=["Qwen3ForCausalLM"], matryoshka_dimensions=[16, 32, 64])
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    prompts = [hf_tokenizer(t)["input_ids"] for t in TEXTS]
    with torch.no_grad():
        want = [hf(torch.tensor([ids])).last_hidden_state[0, -1] for ids in prompts]
    with Engine(model_path=path, is_embedding=True, random_seed=0) as engine:
        yield engine, prompts, want


def test_last_token_pooling_normalized_matches_hf(embedder):
    engine, prompts, want = embedder
    res = engine.encode(prompts)
    for r, w in zip(res, want):
        got = torch.tensor(r["embedding"])
        assert got.shape == (64,)
        assert torch.allclose(got, torch.nn.functional.normalize(w, dim=-1), atol=1e-5)


def test_dimensions_truncate_then_normalize(embedder):
    engine, prompts, want = embedder
    res = engine.encode(prompts, dimensions=16)
    for r, w in zip(res, want):
        got = torch.tensor(r["embedding"])
        assert got.shape == (16,)
        assert torch.allclose(got, torch.nn.functional.normalize(w[:16], dim=-1), atol=1e-5)
    one = engine.encode(TEXTS[0], dimensions=32)["embedding"]
    assert len(one) == 32 and abs(sum(v * v for v in one) - 1) < 1e-5
    with pytest.raises(ValueError, match=r"only supports \[16, 32, 64\]"):
        engine.encode(TEXTS[0], dimensions=24)
    with pytest.raises(ValueError, match="greater than 0"):
        engine.encode(TEXTS[0], dimensions=0)
    with pytest.raises(TypeError, match="dimensions must be an int"):
        engine.encode(TEXTS[0], dimensions="16")
