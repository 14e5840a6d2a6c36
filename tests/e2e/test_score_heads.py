"""Classification, reward and cross-encoder heads, ``rerank`` and ``score`` against transformers
(issue 24, acceptance 4): tiny random-weight models built with transformers' own classes, float32."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from treadle import Engine

pytestmark = pytest.mark.e2e

TEXTS = ["Hello world", "The cat sat on the mat.", "Paris is the capital of France and a big city.",
         "Quantum computers use qubits.", "To be or not to be, that is the question.", "Coffee or tea?",
         "Électricité et café à Montréal.", "A quick brown fox jumps over the lazy dog."]
PAIRS = [["what is a panda?", "hi"], ["what is a panda?", "The giant panda is a bear species endemic to China."],
         ["how tall is Everest?", "Mount Everest is 8,849 metres high."], ["coffee", "Tea is a drink."]]
TOL = 1e-5


def _close(got, want, tol=TOL) -> None:
    got = got if isinstance(got, list) else [got]
    assert len(got) == len(want) and all(abs(g - w) <= tol for g, w in zip(got, want)), (got, want)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, default_model_dir, hf_tokenizer):
    from tiny_heads import build_llama_classifier

    path, ref = build_llama_classifier(str(tmp_path_factory.mktemp("llama_cls")), default_model_dir)
    with Engine(model_path=path, random_seed=0) as eng:  # no is_embedding: the architecture implies it
        yield eng, ref


@pytest.fixture(scope="module")
def reward(tmp_path_factory, default_model_dir):
    from tiny_heads import build_qwen2_reward

    path, ref = build_qwen2_reward(str(tmp_path_factory.mktemp("qwen2_rm")), default_model_dir)
    with Engine(model_path=path, random_seed=0) as eng:
        yield eng, ref


@pytest.fixture(scope="module", params=["bert", "xlmr"])
def cross_encoder(request, tmp_path_factory):
    from tiny_heads import build_cross_encoder
    from transformers import AutoTokenizer

    from treadle.runtime.model_files import minilm_dir

    extra = {"sbert_ce_default_activation_function": "torch.nn.modules.activation.Sigmoid"} \
        if request.param == "xlmr" else {}  # one checkpoint declares an activation, the other gives raw logits
    path, ref = build_cross_encoder(str(tmp_path_factory.mktemp(request.param)), minilm_dir(), request.param, **extra)
    with Engine(model_path=path, random_seed=0) as eng:
        yield eng, ref, AutoTokenizer.from_pretrained(minilm_dir())


def test_classifier_scores_match_hf(classifier, hf_tokenizer):
    eng, ref = classifier
    res = eng.encode(TEXTS)
    for text, got in zip(TEXTS, res["embedding"]):
        _close(got, ref(hf_tokenizer(text)["input_ids"]))
    one = eng.encode(TEXTS[2])  # single call, and token ids
    _close(one["embedding"], ref(hf_tokenizer(TEXTS[2])["input_ids"]))
    ids = hf_tokenizer(TEXTS[3])["input_ids"]
    _close(eng.encode(ids)["embedding"], ref(ids))
    # score() on a classification model: its class scores, softmaxed on request (label ids ignored)
    sc = eng.score(query="", items=TEXTS[:2], apply_softmax=True)
    for text, got in zip(TEXTS[:2], sc.scores):
        _close(got, torch.softmax(torch.tensor(ref(hf_tokenizer(text)["input_ids"])), 0).tolist())
    assert eng.get_server_info()["is_embedding"] is True
    with pytest.raises(ValueError, match="encode"):
        eng.generate("Hello")


def test_reward_model_scores_match_hf(reward, hf_tokenizer):
    eng, ref = reward
    res = eng.encode(TEXTS)
    for text, got in zip(TEXTS, res["embedding"]):
        _close(got, ref(hf_tokenizer(text)["input_ids"]))

    async def run():
        return await eng.async_encode(TEXTS[:3])
    for text, got in zip(TEXTS, asyncio.run(run())["embedding"]):
        _close(got, ref(hf_tokenizer(text)["input_ids"]))


def test_rerank_matches_hf(cross_encoder):
    eng, ref, tok = cross_encoder
    res = eng.rerank(PAIRS)
    assert len(res) == len(PAIRS)
    for (q, d), r in zip(PAIRS, res):
        enc = tok(q, d)
        assert isinstance(r["embedding"], float) and r["meta_info"]["prompt_tokens"] == len(enc["input_ids"])
        _close(r["embedding"], ref(enc["input_ids"], enc["token_type_ids"]))
    single = eng.encode(TEXTS[1])["embedding"]  # one text: segment 0 throughout
    enc = tok(TEXTS[1])
    _close(single, ref(enc["input_ids"], enc["token_type_ids"]))
    for bad in ([["only one"]], "q", [["q", 3]], []):
        with pytest.raises(TypeError, match="pairs"):
            eng.rerank(bad)
    limit = eng.get_server_info()["context_length"]  # XLM-R: its position table less the padding offset
    long_doc = " ".join(["word"] * limit)
    with pytest.raises(ValueError, match="longer than"):
        eng.rerank([["q", long_doc]])
    fits = tok("q", long_doc, truncation="only_second", max_length=limit)  # every position of the table
    _close(eng.rerank([["q", tok.decode(fits["input_ids"][3:-1])]])[0]["embedding"],
           ref(fits["input_ids"], fits["token_type_ids"]))


def test_http_rerank_route(cross_encoder):
    import httpx
    from serve_helpers import serve_in_thread

    eng, ref, tok = cross_encoder
    docs = [d for _, d in PAIRS[:2]]
    with serve_in_thread(eng) as url:
        r = httpx.post(f"{url}/v1/rerank", json={"query": PAIRS[0][0], "documents": docs}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert [x["score"] for x in body] == sorted((x["score"] for x in body), reverse=True)
        for x in body:
            enc = tok(PAIRS[0][0], docs[x["index"]])
            assert x["document"] == docs[x["index"]]
            _close(x["score"], ref(enc["input_ids"], enc["token_type_ids"]))
        top = httpx.post(f"{url}/v1/rerank", json={"query": "q", "documents": docs, "top_n": 1,
                                                   "return_documents": False}, timeout=60).json()
        assert len(top) == 1 and "document" not in top[0]
        bad = httpx.post(f"{url}/v1/rerank", json={"query": "q", "documents": []}, timeout=60)
        assert bad.status_code == 400 and "documents" in bad.text


def test_score_matches_hf_softmax_over_labels(engine, hf_gguf_model, hf_tokenizer):
    query = "Is the following city the capital of France? "
    items = ["Paris. Answer:", "London. Answer:"]
    labels = [hf_tokenizer.encode(w, add_special_tokens=False)[0] for w in (" Yes", " No", " Maybe")]

    def hf_scores(ids: list[int], softmax: bool) -> list[float]:
        with torch.no_grad():
            logits = hf_gguf_model(torch.tensor([ids])).logits[0, -1]
        sel = logits[labels]
        return (torch.softmax(sel, 0) if softmax else torch.softmax(logits, 0)[labels]).tolist()

    res = engine.score(query=query, items=items, label_token_ids=labels, apply_softmax=True)
    assert len(res.scores) == 2 and abs(sum(res.scores[0]) - 1) < 1e-6
    for item, got in zip(items, res.scores):
        _close(got, hf_scores(hf_tokenizer(query + item)["input_ids"], True), 1e-4)
    raw = engine.score(query=query, items=items[0], label_token_ids=labels)  # probabilities over the vocabulary
    _close(raw.scores[0], hf_scores(hf_tokenizer(query + items[0])["input_ids"], False), 1e-4)
    assert raw.prompt_tokens == len(hf_tokenizer(query + items[0])["input_ids"])
    q_ids, i_ids = hf_tokenizer.encode(query), [hf_tokenizer.encode(i, add_special_tokens=False) for i in items[:1]]
    first = engine.score(query=q_ids, items=i_ids, label_token_ids=labels, apply_softmax=True, item_first=True)
    for ids, got in zip(i_ids, first.scores):
        _close(got, hf_scores(ids + q_ids, True), 1e-4)
    asy = asyncio.run(engine.async_score(query=query, items=items, label_token_ids=labels, apply_softmax=True))
    for got, want in zip(asy.scores, res.scores):
        _close(got, want, 1e-6)
    assert engine.score(query=query, items=[], label_token_ids=labels).scores == []


def test_score_and_rerank_errors(engine):
    with pytest.raises(ValueError, match="label_token_ids must be provided"):
        engine.score(query="a", items=["b"])
    with pytest.raises(ValueError, match="out of vocabulary"):
        engine.score(query="a", items=["b"], label_token_ids=[10**7])
    with pytest.raises(ValueError, match="both"):
        engine.score(query="a", items=[[1, 2]], label_token_ids=[1])
    with pytest.raises(ValueError, match="items must be provided"):
        engine.score(query="a", label_token_ids=[1])
    with pytest.raises(ValueError, match="cross-encoder"):
        engine.rerank([["q", "d"]])
    assert not math.isnan(engine.score(query="a", items="b", label_token_ids=[1]).scores[0][0])


def test_http_score_route(engine, hf_tokenizer):
    import httpx
    from serve_helpers import serve_in_thread

    labels = [hf_tokenizer.encode(w, add_special_tokens=False)[0] for w in (" Yes", " No")]
    want = engine.score(query="Is Paris in France?", items=[" Answer:"], label_token_ids=labels, apply_softmax=True)
    with serve_in_thread(engine) as url:
        r = httpx.post(f"{url}/v1/score", json={"query": "Is Paris in France?", "items": [" Answer:"],
                                                 "label_token_ids": labels, "apply_softmax": True}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "scoring" and body["usage"]["prompt_tokens"] == want.prompt_tokens
        _close(body["scores"][0], want.scores[0], 1e-6)
        bad = httpx.post(f"{url}/v1/score", json={"query": "a", "items": ["b"]}, timeout=60)
        assert bad.status_code == 400 and "label_token_ids" in bad.text
