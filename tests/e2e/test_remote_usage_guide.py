"""Acceptance 5: the usage guide's examples pass through ``RemoteEngine`` as they pass in-process.

Each example runs twice, on the in-process ``Engine`` and on a ``RemoteEngine`` pointed at
``serve_in_thread`` of that same engine (one engine for the module, generation kept short for the
CPU); the greedy tests check that both give identical results, token for token and logprob for
logprob. The last tests serve the embeddings model the same way.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import time

import jsonschema
import numpy as np
import pytest

from treadle import BatchResult, EngineDeadError, FlushCacheReqOutput, RemoteEngine

from serve_helpers import serve_in_thread

pytestmark = pytest.mark.e2e
GREEDY = {"temperature": 0, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def server_url(engine):
    with serve_in_thread(engine) as url:
        yield url


@pytest.fixture(scope="module")
def remote(server_url):
    r = RemoteEngine(server_url)
    yield r
    r.shutdown()


@pytest.fixture(params=["in_process", "remote"])
def eng(request, engine):
    """The example's ``engine``: the in-process one, or the same one behind HTTP."""
    return engine if request.param == "in_process" else request.getfixturevalue("remote")


def running(engine) -> int:
    return sum(s["num_running"] for s in engine.get_server_info()["internal_states"])


# ------------------------------------------------------------------ the guide's examples, both ways
def test_basic_usage(eng):
    response = eng.generate(
        prompt="Hello, how are you?",
        sampling_params={"temperature": 0.8, "max_new_tokens": 4}
    )
    assert isinstance(response, dict) and isinstance(response["text"], str)
    assert 1 <= response["meta_info"]["completion_tokens"] <= 4


def test_single_prompt_meta_info(eng):
    response = eng.generate(prompt="Explain quantum computing",
                            sampling_params={"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 3})
    meta = response["meta_info"]
    assert meta["prompt_tokens"] == 3
    assert {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "e2e_latency"} <= set(meta)


def test_batch_generation(eng):
    prompts = ["What is the capital of France?", "What is the capital of Germany?", "What is the capital of Italy?"]
    response = eng.generate(prompt=prompts, sampling_params={"temperature": 0.8, "max_new_tokens": 3})
    assert isinstance(response, BatchResult) and len(response["text"]) == 3
    assert [r["text"] for r in response] == response["text"]


def test_token_ids_input(eng, hf_tokenizer):
    token_ids = hf_tokenizer("What is machine learning?")["input_ids"]
    response = eng.generate(input_ids=token_ids, sampling_params={"max_new_tokens": 2})
    assert response["meta_info"]["prompt_tokens"] == len(token_ids)
    batch = eng.generate(input_ids=[token_ids, token_ids[:3]], sampling_params={"max_new_tokens": 2})
    assert [m["prompt_tokens"] for m in batch["meta_info"]] == [len(token_ids), 3]


def test_sync_streaming(eng):
    chunks = list(eng.generate(prompt="Tell me a long story", sampling_params={"temperature": 0.8, "max_new_tokens": 4},
                               stream=True))
    assert chunks[-1]["meta_info"]["finish_reason"] is not None
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert len([t for c in chunks for t in c["output_ids"]]) == chunks[-1]["meta_info"]["completion_tokens"]


def test_async_streaming_and_gather(eng):
    async def generate_async():
        texts = [chunk["text"] async for chunk in await eng.async_generate(
            prompt="Write a poem", sampling_params={"temperature": 0.9, "max_new_tokens": 4}, stream=True)]
        many = await asyncio.gather(*[eng.async_generate(prompt=f"Number {i}", sampling_params={"max_new_tokens": 2})
                                      for i in range(3)])
        return texts, many

    texts, many = asyncio.run(generate_async())
    assert len(texts) >= 1 and len(many) == 3 and all(m["meta_info"]["completion_tokens"] <= 2 for m in many)


def test_structured_output(eng):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    response = eng.generate(prompt="Generate information about a person named John",
                            sampling_params={"temperature": 0, "max_new_tokens": 40, "json_schema": json.dumps(schema)})
    jsonschema.validate(json.loads(response["text"]), schema)
    phone = eng.generate(prompt="Generate a phone number",
                         sampling_params={"max_new_tokens": 20, "regex": r"\d{3}-\d{3}-\d{4}"})
    assert re.fullmatch(r"\d{3}-\d{3}-\d{4}", phone["text"])
    grammar = 'root ::= number ("+" number)*\nnumber ::= [0-9]+\n'
    eq = eng.generate(prompt="Generate a mathematical equation", sampling_params={"max_new_tokens": 4, "ebnf": grammar})
    assert eq["text"] and set(eq["text"]) <= set("0123456789+")


def test_logprobs(eng):
    response = eng.generate(prompt="The capital of France is", sampling_params={"max_new_tokens": 3},
                            return_logprob=True, top_logprobs_num=3)
    out = response["meta_info"]["output_token_logprobs"]
    assert len(out) == 3 and all(isinstance(t, tuple) and len(t) == 3 and t[0] <= 0 for t in out)
    tops = response["meta_info"]["output_top_logprobs"]
    assert len(tops) == 3 and all(len(top) == 3 and isinstance(top[0], tuple) for top in tops)


def test_sessions(eng):
    session_id = eng.open_session(capacity_of_str_len=4096)
    try:
        assert eng.open_session(capacity_of_str_len=4096, session_id=session_id) is None  # already open
        first = eng.generate(prompt="My name is Alice.", session_params={"session_id": session_id},
                             sampling_params={"max_new_tokens": 2})
        second = eng.generate(prompt="What is my name?", session_params={"session_id": session_id},
                              sampling_params={"max_new_tokens": 2})
        context = first["meta_info"]["prompt_tokens"] + first["meta_info"]["completion_tokens"]
        assert second["meta_info"]["prompt_tokens"] > context  # the first turn is the second's context
    finally:
        eng.close_session(session_id)


def test_flush_cache_and_server_info(eng):
    out = eng.flush_cache()
    assert isinstance(out, FlushCacheReqOutput) and out.success
    info = eng.get_server_info()
    assert info["model_path"] == "default" and info["tp_size"] == 1 and info["max_total_tokens"] > 0
    for key in ("tokenizer_path", "dp_size", "pp_size", "page_size", "context_length", "attention_backend", "device",
                "version"):
        assert key in info


def test_error_handling(eng):
    with pytest.raises(ValueError, match="temperature"):
        eng.generate(prompt="test", sampling_params={"temperature": -1.0})
    with pytest.raises(TypeError, match="bogus"):
        eng.generate(prompt="test", sampling_params={"bogus": 1})
    assert eng.generate(prompt="test", sampling_params={"max_new_tokens": 2})["meta_info"]["completion_tokens"] <= 2


def test_memory_optimization_freeze_gc(eng):
    # the guide's "Memory Optimization" example: warm up, freeze GC, go on
    for _ in range(2):
        eng.generate(prompt="warmup", sampling_params={"max_new_tokens": 2})
    eng.freeze_gc()
    assert eng.generate(prompt="after", sampling_params={"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2


def test_profiling(eng, tmp_path):
    with pytest.raises(TypeError, match="profile_nmae"):
        eng.start_profile(profile_nmae="typo")
    with pytest.raises(RuntimeError, match="not in progress"):
        eng.stop_profile()
    eng.start_profile(profile_name="my_profile", profile_dir=str(tmp_path / "profiles"), activities=["CPU"])
    eng.generate(prompt="Request 0", sampling_params={"max_new_tokens": 2})
    eng.stop_profile()
    files = os.listdir(tmp_path / "profiles")
    assert len(files) == 1 and files[0].startswith("my_profile-")


def test_abort_request(eng):
    stream = eng.generate(prompt="Count to a thousand:", rid="to-abort", stream=True,
                          sampling_params={"max_new_tokens": 400, "ignore_eos": True, "temperature": 0})
    first = next(stream)
    assert first["meta_info"]["finish_reason"] is None
    eng.abort_request(rid="to-abort")
    last = list(stream)[-1]
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert last["meta_info"]["completion_tokens"] < 400


# ------------------------------------------------------------------ greedy parity: identical results
def test_greedy_results_are_identical(engine, remote):
    """Each call starts from an empty prefix cache, so both sides compute the same prefill and the
    logprobs agree to the bit (a cached prefix changes the float sums, not the HTTP path)."""
    prompts = ["The capital of France is", "def fibonacci(n):"]
    kwargs = {"sampling_params": GREEDY, "return_logprob": True, "top_logprobs_num": 2}

    def fresh(call):
        deadline = time.monotonic() + 10  # an earlier test's aborted request may still be freeing its pages
        while not engine.flush_cache().success:
            assert time.monotonic() < deadline, "the engine did not become idle"
            time.sleep(0.1)
        return call()

    local = fresh(lambda: engine.generate(prompt=prompts, **kwargs))
    far = fresh(lambda: remote.generate(prompt=prompts, **kwargs))
    for a, b in zip(local, far):
        assert a["text"] == b["text"] and a["output_ids"] == b["output_ids"]
        for key in ("output_token_logprobs", "output_top_logprobs", "input_token_logprobs", "finish_reason",
                    "prompt_tokens", "completion_tokens"):
            assert a["meta_info"][key] == b["meta_info"][key], key
    one = fresh(lambda: engine.generate(prompt=prompts[0], sampling_params=GREEDY))
    streamed = fresh(lambda: list(remote.generate(prompt=prompts[0], sampling_params=GREEDY, stream=True)))
    assert "".join(c["text"] for c in streamed) == one["text"]
    assert [t for c in streamed for t in c["output_ids"]] == one["output_ids"]
    far_async = fresh(lambda: asyncio.run(remote.async_generate(prompt=prompts[1], sampling_params=GREEDY)))
    local_async = fresh(lambda: asyncio.run(engine.async_generate(prompt=prompts[1], sampling_params=GREEDY)))
    assert far_async["output_ids"] == local_async["output_ids"] and far_async["text"] == local_async["text"]


# ------------------------------------------------------------------ what only the remote client has
def test_closing_a_stream_early_aborts_it_on_the_server(engine, remote):
    stream = remote.generate(prompt="Tell me a long story", stream=True,
                             sampling_params={"max_new_tokens": 2000, "ignore_eos": True})
    next(stream)
    assert running(engine) == 1
    stream.close()
    wait_idle(engine)

    async def read_one_and_leave():  # left half-read: the loop's finalizer closes the stream
        async for _ in await remote.async_generate(prompt="Tell me a long story", stream=True,
                                                   sampling_params={"max_new_tokens": 2000, "ignore_eos": True}):
            assert running(engine) == 1
            break

    asyncio.run(read_one_and_leave())
    wait_idle(engine)


def wait_idle(engine) -> None:
    deadline = time.monotonic() + 10
    while running(engine) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running(engine) == 0


def test_context_manager_closes_only_the_client(server_url, engine):
    with RemoteEngine(server_url) as r:
        assert r.generate(prompt="Hi", sampling_params={"max_new_tokens": 2})["meta_info"]["completion_tokens"] <= 2
        assert r.server_args.model_path == "default"
    with pytest.raises(EngineDeadError, match="shut down"):
        r.generate(prompt="Hi")
    assert engine.generate(prompt="Hi", sampling_params={"max_new_tokens": 1})["meta_info"]["completion_tokens"] == 1


def test_api_key_and_an_unreachable_server(engine):
    with serve_in_thread(engine, api_key="secret") as url:
        with pytest.raises(PermissionError, match="api_key"):
            RemoteEngine(url).generate(prompt="Hi", sampling_params={"max_new_tokens": 1})
        keyed = RemoteEngine(url, api_key="secret")
        assert keyed.generate(prompt="Hi", sampling_params={"max_new_tokens": 1})["meta_info"]["completion_tokens"] == 1
    with pytest.raises(EngineDeadError, match=url.split("//")[1]):  # the server is gone now
        keyed.generate(prompt="Hi")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EngineDeadError, match=f"127.0.0.1:{port}"):
        RemoteEngine(f"http://127.0.0.1:{port}").get_server_info()


# ------------------------------------------------------------------ embeddings
def test_embeddings_through_http_equal_in_process(minilm):
    prompts = ["Hello world", "SGLang is fast"]
    with serve_in_thread(minilm, served_model_name="all-MiniLM-L6-v2") as url:
        with RemoteEngine(url) as remote_minilm:
            far = remote_minilm.encode(prompt=prompts)
            one = asyncio.run(remote_minilm.async_encode(prompt=prompts[0]))
            with pytest.raises(ValueError, match="embedding"):
                remote_minilm.generate(prompt="Hi")
    local = minilm.encode(prompt=prompts)
    assert isinstance(far, BatchResult) and len(far["embedding"]) == 2
    for i, embedding in enumerate(far["embedding"]):
        assert len(embedding) == 384
        np.testing.assert_allclose(embedding, local["embedding"][i], rtol=0, atol=1e-6)
    np.testing.assert_allclose(one["embedding"], local["embedding"][0], rtol=0, atol=1e-6)
