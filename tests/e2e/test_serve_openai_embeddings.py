"""Issue 22, acceptance 1: ``/v1/embeddings`` through the official ``openai`` client over an
all-MiniLM-L6-v2 engine equals the in-process ``encode`` (cosine > 0.9999), as floats and as
base64; errors in OpenAI's shape."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest

from serve_helpers import serve_in_thread

pytestmark = pytest.mark.e2e

MODEL = "minilm"
TEXTS = ["Paris is the capital of France.", "Embeddings map text to vectors.", "Coffee or tea?"]


@pytest.fixture(scope="module")
def url(minilm):
    with serve_in_thread(minilm, MODEL) as base:
        yield base


def _cos(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_embeddings_equal_in_process_encode(url, minilm):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    ref = minilm.encode(TEXTS)["embedding"]
    out = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    assert [d.index for d in out.data] == [0, 1, 2]
    for d, r in zip(out.data, ref):
        assert len(d.embedding) == len(r) == 384 and _cos(d.embedding, r) > 0.9999
    assert out.usage.prompt_tokens == out.usage.total_tokens > len(TEXTS)
    # the openai client asks for base64 by default and decodes it
    b64 = client.embeddings.create(model=MODEL, input=TEXTS[0])
    assert _cos(b64.data[0].embedding, ref[0]) > 0.9999
    ids = client.embeddings.create(model=MODEL, input=[101, 7592, 2088, 102], encoding_format="float")
    assert _cos(ids.data[0].embedding, minilm.encode([101, 7592, 2088, 102])["embedding"]) > 0.9999


def test_embedding_errors(url):
    r = httpx.post(f"{url}/v1/embeddings", json={"model": "other", "input": "x"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = httpx.post(f"{url}/v1/embeddings", json={"model": MODEL, "input": {"a": 1}}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    r = httpx.post(f"{url}/v1/embeddings", json={"model": MODEL, "input": "fine"}, timeout=30)
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384
