"""SGLang's native routes over HTTP against the in-process engine they serve (one engine for the
module, served twice: without and with an API key)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Iterator

import httpx
import pytest

from tests.e2e.serve_helpers import serve_in_thread

GREEDY = {"max_new_tokens": 6, "temperature": 0.0}
KEY = "sk-test-key"


@pytest.fixture(scope="module")
def urls(engine: Any) -> Iterator[tuple[str, str]]:
    with serve_in_thread(engine, "default") as open_url, serve_in_thread(engine, "default", api_key=KEY) as key_url:
        yield open_url, key_url


@pytest.fixture(scope="module")
def client(urls: tuple[str, str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=urls[0], timeout=120) as c:
        yield c


def sse(client: httpx.Client, body: dict) -> list[Any]:
    """The events of a streamed /generate, ``[DONE]`` as the string."""
    events = []
    with client.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))
    return events


def test_generate_equals_the_in_process_engine_token_for_token(client: httpx.Client, engine: Any) -> None:
    prompt = "The capital of France is"
    local = engine.generate(prompt, GREEDY)
    r = client.post("/generate", json={"text": prompt, "sampling_params": GREEDY})
    assert r.status_code == 200
    remote = r.json()
    assert remote["output_ids"] == local["output_ids"] and remote["text"] == local["text"]
    assert remote["meta_info"]["finish_reason"] == local["meta_info"]["finish_reason"]
    ids = [1, 504, 3458, 282, 4649, 314]
    by_ids = client.post("/generate", json={"input_ids": ids, "sampling_params": GREEDY})
    assert by_ids.status_code == 200
    assert by_ids.json()["output_ids"] == engine.generate(input_ids=ids, sampling_params=GREEDY)["output_ids"]


def test_streamed_chunks_concatenate_to_the_same_text_and_end_with_done(client: httpx.Client, engine: Any) -> None:
    prompt = "Once upon a time"
    whole = engine.generate(prompt, GREEDY)["text"]
    events = sse(client, {"text": prompt, "sampling_params": GREEDY})
    assert events[-1] == "[DONE]" and len(events) >= 3
    assert "".join(e["text"] for e in events[:-1]) == whole
    assert events[-2]["meta_info"]["finish_reason"]["type"] == "length"


def test_batch_generate_returns_a_list_in_order(client: httpx.Client, engine: Any) -> None:
    prompts = ["One, two, three,", "Red, green,"]
    local = engine.generate(prompts, GREEDY)
    r = client.post("/generate", json={"text": prompts, "sampling_params": GREEDY})
    assert r.status_code == 200
    assert [x["output_ids"] for x in r.json()] == [x["output_ids"] for x in local]
    events = sse(client, {"text": prompts, "sampling_params": GREEDY})
    assert events[-1] == "[DONE]" and {e["index"] for e in events[:-1]} == {0, 1}


def test_info_routes(client: httpx.Client, engine: Any) -> None:
    info = client.get("/get_server_info").json()
    assert info["model_path"] == "default" and info["internal_states"][0]["num_running"] == 0
    assert info["max_total_tokens"] == engine.get_server_info()["max_total_tokens"]
    model = client.get("/get_model_info").json()
    assert model == {**engine.get_model_info(), "served_model_name": "default"}
    assert {k: model[k] for k in ("model_path", "tokenizer_path", "is_generation", "preferred_sampling_params",
                                  "weight_version", "architectures")} == {
        "model_path": "default", "tokenizer_path": engine.server_args.tokenizer_path, "is_generation": True,
        "preferred_sampling_params": None, "weight_version": "default", "architectures": ["LlamaForCausalLM"]}
    assert client.get("/health").status_code == 200
    assert client.get("/health_generate").status_code == 200


def test_flush_cache_both_methods(client: httpx.Client) -> None:
    for method in ("POST", "GET"):
        r = client.request(method, "/flush_cache")
        assert r.status_code == 200 and r.json() == {"success": True, "message": ""}


def test_abort_request_ends_a_running_stream_with_abort(client: httpx.Client) -> None:
    result: dict[str, Any] = {}

    def run() -> None:
        result["events"] = sse(client, {"text": "Count slowly:", "rid": "to-abort",
                                        "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}})

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and client.get("/get_server_info").json()["internal_states"][0]["num_running"] == 0:
        time.sleep(0.05)
    r = client.post("/abort_request", json={"rid": "to-abort"})
    assert r.status_code == 200 and r.json() == {}
    t.join(timeout=60)
    events = result["events"]
    assert events[-1] == "[DONE]"
    assert events[-2]["meta_info"]["finish_reason"]["type"] == "abort"
    assert events[-2]["meta_info"]["completion_tokens"] < 400
    assert client.post("/abort_request", json={"abort_all": True}).status_code == 200


def test_sessions_over_http(client: httpx.Client) -> None:
    sid = client.post("/open_session", json={"capacity_of_str_len": 1000}).json()
    assert isinstance(sid, str) and sid
    again = client.post("/open_session", json={"capacity_of_str_len": 1000, "session_id": sid})
    assert again.status_code == 400 and again.json()["error"]["param"] == "session_id"
    first = client.post("/generate", json={"text": "My name is Ada.", "sampling_params": GREEDY,
                                           "session_params": {"id": sid}})
    assert first.status_code == 200
    second = client.post("/generate", json={"text": " What is my name?", "sampling_params": GREEDY,
                                            "session_params": {"id": sid}})
    assert second.status_code == 200
    # the second turn's prompt holds the first turn (its prompt and output) as context
    assert second.json()["meta_info"]["prompt_tokens"] > first.json()["meta_info"]["prompt_tokens"] + 4
    assert client.post("/close_session", json={"session_id": sid}).json() == {}
    gone = client.post("/generate", json={"text": "x", "sampling_params": GREEDY, "session_params": {"id": sid}})
    assert gone.status_code == 400 or gone.json()["meta_info"]["finish_reason"]["type"] == "abort"


def test_metrics_count_what_was_served(client: httpx.Client) -> None:
    def series(text: str, name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    before = client.get("/metrics").text
    assert client.post("/generate", json={"text": "Hello", "sampling_params": GREEDY}).status_code == 200
    assert sse(client, {"text": "Hi", "sampling_params": GREEDY})[-1] == "[DONE]"
    after = client.get("/metrics")
    assert after.status_code == 200 and after.headers["content-type"].startswith("text/plain")
    text = after.text
    assert series(text, 'treadle:num_requests_total{model_name="default",outcome="success"}') >= \
        series(before, 'treadle:num_requests_total{model_name="default",outcome="success"}') + 2
    assert series(text, "treadle:generation_tokens_total") >= series(before, "treadle:generation_tokens_total") + 12
    assert series(text, "treadle:prompt_tokens_total") > series(before, "treadle:prompt_tokens_total")
    for name in ("treadle:time_to_first_token_seconds_count", "treadle:inter_token_latency_seconds_count",
                 "treadle:e2e_request_latency_seconds_count"):
        assert series(text, name) > series(before, name), name
    for gauge in ("treadle:num_running_reqs", "treadle:num_queue_reqs", "treadle:token_usage",
                  "treadle:cache_hit_rate"):
        assert gauge + "{" in text, gauge


ROUTES = [("GET", "/get_server_info", None), ("GET", "/get_model_info", None), ("GET", "/health_generate", None),
          ("POST", "/generate", {"text": "x", "sampling_params": {"max_new_tokens": 1}}), ("POST", "/encode", {"text": "x"}),
          ("POST", "/flush_cache", None), ("POST", "/abort_request", {"abort_all": True}),
          ("POST", "/open_session", {"capacity_of_str_len": 10}), ("POST", "/close_session", {"session_id": "s"}),
          ("POST", "/start_profile", {}), ("POST", "/stop_profile", None), ("GET", "/metrics", None),
          ("POST", "/load_lora_adapter", {"lora_name": "a", "lora_path": "/x"}),
          ("POST", "/unload_lora_adapter", {"lora_name": "a"}), ("POST", "/freeze_gc", None), ("GET", "/v1/models", None),
          ("POST", "/v1/completions", {"model": "default", "prompt": "x", "max_tokens": 1}),
          ("POST", "/v1/chat/completions", {"model": "default", "messages": [{"role": "user", "content": "x"}]}),
          ("POST", "/v1/embeddings", {"model": "default", "input": "x"})]


@pytest.mark.parametrize("method,path,body", ROUTES, ids=[r[1] for r in ROUTES])
def test_api_key_is_required_on_every_route_but_health(urls: tuple[str, str], method: str, path: str,
                                                         body: Any) -> None:
    url = urls[1]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.request(method, url + path, json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(url + "/health", timeout=30).status_code == 200


def test_the_right_api_key_is_served(urls: tuple[str, str]) -> None:
    r = httpx.post(urls[1] + "/generate", json={"text": "Hi", "sampling_params": GREEDY},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 6


def test_server_info_masks_the_secrets(urls: tuple[str, str], engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The keys among the server args never leave over HTTP (runtime/redact.py): a set one reads
    "***", an unset one null; the engine itself keeps the real value."""
    monkeypatch.setattr(engine.server_args, "api_key", KEY)  # as `treadle serve --api-key` sets it
    monkeypatch.setattr(engine.server_args, "ssl_keyfile_password", "tls-secret")
    r = httpx.get(urls[1] + "/get_server_info", headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["api_key"] == info["ssl_keyfile_password"] == "***" and info["admin_api_key"] is None
    assert KEY not in r.text and "tls-secret" not in r.text
    assert info["model_path"] == "default" and engine.server_args.api_key == KEY


BAD = [("/generate", "{not json", None), ("/generate", "[1, 2]", None),
       ("/generate", {"text": "x", "sampling_params": 5}, "sampling_params"),
       ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
       ("/generate", {"text": "x", "no_such_field": 1}, "no_such_field"),
       ("/generate", {"text": "x", "sampling_params": {"no_such_param": 1}}, "no_such_param"),
       ("/generate", {"text": "x", "prompt": "y"}, "text"),
       ("/abort_request", {"rid": 3}, "rid"), ("/abort_request", {"rids": "a"}, "rids"),
       ("/open_session", {}, "capacity_of_str_len"), ("/open_session", {"capacity_of_str_len": "10"},
                                                      "capacity_of_str_len"),
       ("/close_session", {"id": "x"}, "id"), ("/start_profile", {"no_such_option": 1}, "no_such_option"),
       ("/load_lora_adapter", {"lora_name": "a"}, "lora_path")]


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_requests_are_400s_naming_the_field_and_the_server_keeps_serving(
        client: httpx.Client, path: str, body: Any, param: Any) -> None:
    kw = {"content": body} if isinstance(body, str) else {"json": body}
    r = client.post(path, **kw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    assert client.post("/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 1}}).status_code == 200


def test_encode_on_a_generation_model_is_a_400_and_on_an_embedding_model_matches(client: httpx.Client,
                                                                                 minilm: Any) -> None:
    r = client.post("/encode", json={"text": "hello"})
    assert r.status_code == 400 and "embedding" in r.json()["error"]["message"]
    emb = minilm  # the session's MiniLM engine (tests/conftest.py)
    with serve_in_thread(emb, "minilm") as url:
        local = emb.encode(["hello world", "bye"])
        remote = httpx.post(url + "/encode", json={"text": ["hello world", "bye"]}, timeout=60).json()
        assert [x["embedding"] for x in remote] == [x["embedding"] for x in local]
        one = httpx.post(url + "/encode", json={"text": "hello world"}, timeout=60).json()
        assert one["embedding"] == local[0]["embedding"]
