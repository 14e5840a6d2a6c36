"""Embeddings: encoder (BERT) and decoder (last-token) models against their references (issue 7)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from treadle import Engine

pytestmark = pytest.mark.e2e

SENTENCES = [
    "Hello world", "SGLang is fast", "The cat sat on the mat.", "A quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France.", "Berlin is the capital of Germany.", "I love machine learning.",
    "Deep learning models need a lot of data.", "The weather is sunny today.", "It might rain tomorrow.",
    "Python is a programming language.", "Rust guarantees memory safety.", "She sells sea shells by the sea shore.",
    "To be or not to be, that is the question.", "Embeddings map text to vectors.", "Cosine similarity compares them.",
    "The stock market fell sharply on Monday.", "A new species of frog was discovered.", "Coffee or tea?",
    "Quantum computers use qubits.", "The Eiffel Tower is in Paris.", "Mount Everest is the highest mountain.",
    "Water boils at 100 degrees Celsius.", "The mitochondria is the powerhouse of the cell.",
    "Shakespeare wrote Hamlet.", "The Great Wall of China is very long.", "Bananas are rich in potassium.",
    "Électricité et café à Montréal.", "東京は日本の首都です。", "Ein kleiner Hund bellt laut.",
    "Emoji test 🙂🚀 works too.", "   leading and trailing spaces   ",
]


@pytest.fixture(scope="module")
def st_reference():
    from sentence_transformers import SentenceTransformer

    from treadle.runtime.model_files import minilm_dir

    return SentenceTransformer(minilm_dir(), device="cpu").encode(SENTENCES, batch_size=8)


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_minilm_matches_sentence_transformers_batched(minilm, st_reference):
    res = minilm.encode(prompt=SENTENCES)
    assert len(res["embedding"]) == 32
    for got, want in zip(res["embedding"], st_reference):
        assert len(got) == 384 and cosine(got, want) > 0.9999


def test_minilm_matches_single_and_async(minilm, st_reference):
    for i in (0, 7, 28, 31):
        assert cosine(minilm.encode(prompt=SENTENCES[i])["embedding"], st_reference[i]) > 0.9999

    async def run():
        return await asyncio.gather(*[minilm.async_encode(prompt=s) for s in SENTENCES[:8]])

    for r, want in zip(asyncio.run(run()), st_reference[:8]):
        assert cosine(r["embedding"], want) > 0.9999


def test_usage_guide_embeddings_example(minilm):
    engine = minilm
    response = engine.encode(
        prompt=["Hello world", "SGLang is fast"]
    )
    dims = [len(embedding) for embedding in response["embedding"]]
    assert dims == [384, 384]
    assert {"id", "finish_reason", "prompt_tokens", "e2e_latency"} <= set(response[0]["meta_info"])


def test_wrong_entry_point_and_length_errors(minilm, engine):
    with pytest.raises(ValueError, match="encode"):
        minilm.generate(prompt="Hello")
    with pytest.raises(ValueError, match="is_embedding=True"):
        engine.encode(prompt="Hello")
    with pytest.raises(ValueError, match="limit of 256 tokens"):
        minilm.encode(prompt="word " * 400)
    assert len(minilm.encode(prompt="still serving")["embedding"]) == 384
    with Engine(model_path="all-MiniLM-L6-v2", is_embedding=True, allow_auto_truncate=True) as trunc:
        assert trunc.encode(prompt="word " * 400)["meta_info"]["prompt_tokens"] == 256


def test_bert_large_shape_cls_matches_hf(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    # BERT-large's layer shape (hidden 1024, 16 heads, FFN 4096) in 2 of its 24 layers: every layer is
    # the same code, and 24 of them (1.3 GB to build, save and load) cost 23 s of the CI suite
    cfg = BertConfig(hidden_size=1024, num_hidden_layers=2, num_attention_heads=16, intermediate_size=4096,
                     vocab_size=30522, max_position_embeddings=512)
    hf = BertModel(cfg, add_pooling_layer=False).eval()
    hf.save_pretrained(tmp_path)
    from treadle.runtime.model_files import minilm_dir
    import shutil

    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(f"{minilm_dir()}/{f}", tmp_path)
    texts = SENTENCES[:6]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path)
    with torch.no_grad():
        want = [hf(**tok(t, return_tensors="pt")).last_hidden_state[0, 0] for t in texts]
    with Engine(model_path=str(tmp_path), is_embedding=True) as eng:
        got = eng.encode(prompt=texts)["embedding"]
    for g, w in zip(got, want):
        w = torch.nn.functional.normalize(w, dim=0)  # CLS pooling, normalized (SGLang's BERT default)
        g = torch.tensor(g)
        assert float((g - w).norm() / w.norm()) < 1e-5


def test_decoder_last_token_embedding_matches_hf(hf_gguf_model, hf_tokenizer):
    texts = ["The capital of France is Paris.", "Embeddings from a decoder model.", "short"]
    with Engine(model_path="default", is_embedding=True) as eng:
        got = eng.encode(prompt=texts)["embedding"]
    for t, g in zip(texts, got):
        with torch.no_grad():
            h = hf_gguf_model(**hf_tokenizer(t, return_tensors="pt"), output_hidden_states=True).hidden_states[-1][0, -1]
        w = torch.nn.functional.normalize(h, dim=0)
        assert float((torch.tensor(g) - w).norm() / w.norm()) < 1e-5
