"""RemoteEngine without a server: httpx.MockTransport answers as ``treadle serve`` would, and the
tests check the request bodies, the result shapes, the SSE parsing and the error mapping."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import numpy as np
import pytest

from treadle import BatchResult, EngineDeadError, EngineOverloadedError, RemoteEngine
from treadle.client.remote_wire import sse_chunks

URL = "http://treadle.test:30000"


def result(text="Paris", rid="r1", **meta):
    return {"text": text, "output_ids": [1, 2], "meta_info": {"id": rid, "finish_reason": {"type": "length", "length": 2},
                                                              "prompt_tokens": 3, "completion_tokens": 2, **meta}}


def sse(*events: object, done: bool = True) -> bytes:
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    return body + (b"data: [DONE]\n\n" if done else b"")


def error(status: int, message: str, code=None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": message, "type": "x", "param": None,
                                                  "code": status if code is None else code}})


class Server:
    """A handler recording each request; ``answer(request)`` decides the response."""

    def __init__(self, answer):
        self.answer = answer
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.answer(request)

    @property
    def body(self) -> dict:
        return json.loads(self.requests[-1].content)


def remote(answer, **kwargs) -> tuple[RemoteEngine, Server]:
    server = Server(answer)
    return RemoteEngine(URL, transport=httpx.MockTransport(server), **kwargs), server


# ---------------------------------------------------------------------------------------- results
def test_generate_sends_the_engine_arguments_and_restores_logprob_tuples():
    meta = {"output_token_logprobs": [[-0.5, 1, None], [-0.25, 2, None]], "input_token_logprobs": [None, [-1.0, 7, None]],
            "output_top_logprobs": [[[-0.5, 1, None], [-2.0, 9, None]], None]}
    eng, server = remote(lambda r: httpx.Response(200, json=result(**meta)))
    out = eng.generate(prompt="The capital of France is", sampling_params={"max_new_tokens": 2}, return_logprob=True,
                       top_logprobs_num=2)
    req = server.requests[0]
    assert req.method == "POST" and req.url.path == "/generate"
    assert server.body == {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 2},
                           "return_logprob": True, "top_logprobs_num": 2, "return_hidden_states": False,
                           "stream": False}
    assert out["text"] == "Paris" and out["meta_info"]["completion_tokens"] == 2
    assert out["meta_info"]["output_token_logprobs"] == [(-0.5, 1, None), (-0.25, 2, None)]
    assert out["meta_info"]["input_token_logprobs"] == [None, (-1.0, 7, None)]
    assert out["meta_info"]["output_top_logprobs"] == [[(-0.5, 1, None), (-2.0, 9, None)], None]


def test_a_batch_is_a_batch_result_with_column_access():
    eng, server = remote(lambda r: httpx.Response(200, json=[result("a", "x_0"), result("b", "x_1")]))
    out = eng.generate(prompt=["p1", "p2"], sampling_params={"max_new_tokens": 2}, rid="x")
    assert isinstance(out, BatchResult) and out["text"] == ["a", "b"] and [r["text"] for r in out] == ["a", "b"]
    assert server.body["text"] == ["p1", "p2"] and server.body["rid"] == "x"


def test_input_ids_as_numpy_and_the_api_key_header():
    eng, server = remote(lambda r: httpx.Response(200, json=result()), api_key="sk-1")
    eng.generate(input_ids=np.array([5, 6, 7]), sampling_params={"max_new_tokens": 1})
    assert server.body["input_ids"] == [5, 6, 7] and "text" not in server.body
    assert server.requests[0].headers["authorization"] == "Bearer sk-1"


def test_encode_posts_text_and_returns_embeddings():
    emb = [{"embedding": [0.1, 0.2], "meta_info": {"id": "a", "prompt_tokens": 2}}] * 2
    eng, server = remote(lambda r: httpx.Response(200, json=emb))
    out = eng.encode(prompt=["Hello world", "SGLang is fast"])
    assert server.requests[0].url.path == "/encode" and server.body == {"text": ["Hello world", "SGLang is fast"]}
    assert out["embedding"] == [[0.1, 0.2], [0.1, 0.2]]


# ---------------------------------------------------------------------------------------- streams
def test_sse_parsing_skips_blank_and_comment_lines_and_stops_at_done():
    lines = [": keep-alive", "", 'data: {"text": "a", "meta_info": {}}', "event: x", "data:{\"text\": \"b\"}",
             "data: [DONE]", 'data: {"text": "never"}']
    assert [c["text"] for c in sse_chunks(lines, URL)] == ["a", "b"]
    with pytest.raises(EngineDeadError, match="ended before"):
        list(sse_chunks(['data: {"text": "a"}'], URL))


def test_sync_stream_yields_the_chunks_as_sent():
    chunks = [{"text": "Hel", "output_ids": [1], "meta_info": {"finish_reason": None, "output_token_logprobs": [[-1.0, 1, None]]}},
              {"text": "lo", "output_ids": [2], "meta_info": {"finish_reason": {"type": "length", "length": 2}}}]
    eng, server = remote(lambda r: httpx.Response(200, content=sse(*chunks),
                                                  headers={"content-type": "text/event-stream"}))
    got = list(eng.generate(prompt="Hi", sampling_params={"max_new_tokens": 2}, stream=True))
    assert server.body["stream"] is True
    assert [c["text"] for c in got] == ["Hel", "lo"] and got[1]["meta_info"]["finish_reason"]["type"] == "length"
    assert got[0]["meta_info"]["output_token_logprobs"] == [(-1.0, 1, None)]


def test_an_error_inside_a_stream_raises_its_exception():
    err = {"error": {"message": "max_new_tokens is too large", "type": "invalid_request_error", "param": None,
                     "code": 400}}
    eng, _ = remote(lambda r: httpx.Response(200, content=sse({"text": "a", "meta_info": {}}, err)))
    stream = eng.generate(prompt="Hi", stream=True)
    assert next(stream)["text"] == "a"
    with pytest.raises(ValueError, match="max_new_tokens is too large"):
        next(stream)
    overloaded = {"error": {"message": "The request queue is full.", "code": 503}}
    eng, _ = remote(lambda r: httpx.Response(200, content=sse(overloaded)))
    with pytest.raises(EngineOverloadedError):
        list(eng.generate(prompt="Hi", stream=True))


def test_a_stream_refused_up_front_raises_at_the_call():
    eng, _ = remote(lambda r: error(400, "temperature must be non-negative, got -1.0"))
    with pytest.raises(ValueError, match="temperature"):
        eng.generate(prompt="Hi", sampling_params={"temperature": -1.0}, stream=True)


class TrackedStream(httpx.SyncByteStream):
    """A streamed body that never ends on its own and records being closed."""

    def __init__(self):
        self.closed = False

    def __iter__(self):
        yield b'data: {"text": "a", "meta_info": {"finish_reason": null}}\n\n'
        yield b'data: {"text": "b", "meta_info": {"finish_reason": null}}\n\n'
        raise AssertionError("the client read past what it asked for")

    def close(self):
        self.closed = True


def test_closing_a_stream_early_closes_the_response():
    body = TrackedStream()
    eng, _ = remote(lambda r: httpx.Response(200, stream=body))
    stream = eng.generate(prompt="Hi", stream=True)
    assert next(stream)["text"] == "a"
    stream.close()
    assert body.closed
    with pytest.raises(StopIteration):
        next(stream)
    unread = TrackedStream()  # closed before the first chunk was asked for
    eng, _ = remote(lambda r: httpx.Response(200, stream=unread))
    eng.generate(prompt="Hi", stream=True).close()
    assert unread.closed


class TrackedAsyncStream(httpx.AsyncByteStream):
    def __init__(self):
        self.closed = False

    async def __aiter__(self):
        yield b'data: {"text": "a", "meta_info": {"finish_reason": null}}\n\n'
        await asyncio.sleep(3600)  # a long generation the client stops reading
        yield b""

    async def aclose(self):
        self.closed = True


def test_an_async_stream_left_half_read_closes_its_response():
    async def break_out(eng):
        async for chunk in await eng.async_generate(prompt="Hi", stream=True):
            assert chunk["text"] == "a"
            break

    async def close_unread(eng):
        await (await eng.async_generate(prompt="Hi", stream=True)).aclose()

    for use in (break_out, close_unread):
        body = TrackedAsyncStream()
        eng, _ = remote(lambda r: httpx.Response(200, stream=body))
        asyncio.run(asyncio.wait_for(use(eng), 10))
        assert body.closed, use.__name__


def test_async_generate_whole_and_streamed():
    chunks = [{"text": "x", "index": 0, "meta_info": {"finish_reason": None}},
              {"text": "y", "index": 1, "meta_info": {"finish_reason": {"type": "stop"}}}]

    def answer(request):
        if json.loads(request.content).get("stream"):
            return httpx.Response(200, content=sse(*chunks))
        return httpx.Response(200, json=[result("a"), result("b")])

    eng, _ = remote(answer)

    async def run():
        whole = await eng.async_generate(prompt=["p", "q"], sampling_params={"max_new_tokens": 2})
        got = [c async for c in await eng.async_generate(prompt=["p", "q"], stream=True)]
        return whole, got

    for _ in range(2):  # a fresh event loop each time gets its own async client
        whole, got = asyncio.run(run())
        assert isinstance(whole, BatchResult) and whole["text"] == ["a", "b"]
        assert [(c["index"], c["text"]) for c in got] == [(0, "x"), (1, "y")]


# ---------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("status,code,exc,words", [
    (400, None, ValueError, "sampling_params.top_k"),
    (400, None, TypeError, "sampling_params.top_k"),
    (503, "overloaded", EngineOverloadedError, "queue"),
    (503, "engine_dead", EngineDeadError, URL),
    (500, None, RuntimeError, "not in progress"),
    (503, None, EngineDeadError, URL),
    (502, None, EngineDeadError, URL),
    (501, None, NotImplementedError, "not supported"),
    (401, "invalid_api_key", PermissionError, "api_key"),
])
def test_error_statuses_become_the_engine_exceptions(status, code, exc, words):
    message = {400: "sampling_params.top_k must be -1 or positive", "overloaded": "The request queue is full.",
               501: "video is not supported", 500: "RuntimeError: Profiling is not in progress"}.get(
        code if code == "overloaded" else status, "it failed")
    eng, _ = remote(lambda r: error(status, message, code))
    with pytest.raises(exc) as info:
        eng.generate(prompt="Hi")
    assert words in str(info.value)
    if status == 500:  # alive, unlike the statuses that say the engine is gone
        assert not isinstance(info.value, EngineDeadError) and str(info.value) == "Profiling is not in progress"


def test_an_unreachable_server_is_a_dead_engine_naming_the_url():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    eng = RemoteEngine(f"http://127.0.0.1:{port}", timeout=5)
    with pytest.raises(EngineDeadError, match=f"127.0.0.1:{port}"):
        eng.get_server_info()

    def reset(request):
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.")

    eng, _ = remote(reset)
    with pytest.raises(EngineDeadError, match="treadle.test"):
        eng.generate(prompt="Hi")


# ---------------------------------------------------------------------------------------- control
def test_control_calls_and_their_result_objects():
    def answer(request):
        path = request.url.path
        if path == "/flush_cache":
            return httpx.Response(400, json={"success": False, "message": "pending work"})
        if path == "/load_lora_adapter":
            return httpx.Response(200, json={"success": True, "error_message": None, "loaded_adapters": {"m": "/a"}})
        if path == "/unload_lora_adapter":
            return httpx.Response(400, json={"success": False, "error_message": "no such adapter",
                                             "loaded_adapters": {}})
        if path == "/open_session":
            if json.loads(request.content).get("session_id") == "taken":
                return error(400, "Session 'taken' is already open.")
            return httpx.Response(200, json="s-1")
        if path == "/get_server_info":
            return httpx.Response(200, json={"model_path": "default", "tp_size": 1, "max_total_tokens": 4096,
                                             "context_length": 8192, "unknown_key": 1})
        return httpx.Response(200, json={})

    eng, server = remote(answer)
    flushed = eng.flush_cache()
    assert not flushed and flushed.message == "pending work"
    loaded = eng.load_lora_adapter("m", "/a")
    assert loaded.success and loaded.loaded_adapters == {"m": "/a"}
    unloaded = eng.unload_lora_adapter("x")
    assert not unloaded.success and unloaded.error_message == "no such adapter"
    assert eng.open_session(capacity_of_str_len=128) == "s-1"
    assert eng.open_session(capacity_of_str_len=128, session_id="taken") is None
    eng.close_session("s-1")
    assert server.body == {"session_id": "s-1"}
    eng.abort_request()  # nothing named: nothing sent, as the Engine
    n = len(server.requests)
    eng.abort_request(rid="r1")
    assert len(server.requests) == n + 1 and server.body == {"rid": "r1", "abort_all": False}
    asyncio.run(eng.async_abort_request(abort_all=True))
    assert server.requests[-1].url.path == "/abort_request" and server.body == {"rid": None, "abort_all": True}
    eng.start_profile(output_dir="/tmp/p", num_steps=2)
    assert server.body == {"output_dir": "/tmp/p", "num_steps": 2}
    assert eng.server_args.context_length == 8192 and eng.server_args.model_path == "default"


def test_shutdown_closes_the_client_and_refuses_later_calls():
    eng, server = remote(lambda r: httpx.Response(200, json=result()))
    with eng:
        eng.generate(prompt="a")
    with pytest.raises(EngineDeadError, match="shut down"):
        eng.generate(prompt="a")
    eng.shutdown()  # idempotent
    assert len(server.requests) == 1


def test_registered_processor_names_become_import_paths_and_freeze_gc_posts():
    from treadle import DisallowedTokensLogitsProcessor as Shout  # any importable processor class

    eng, server = remote(lambda r: httpx.Response(200, json=result() if r.url.path == "/generate" else {}))
    eng.register_custom_logit_processor("my_processor_function", Shout)
    eng.generate(prompt="Generate a number", custom_logit_processor="my_processor_function")
    assert server.body["custom_logit_processor"] == Shout.to_str()
    eng.generate(prompt=["a", "b"], custom_logit_processor=["my_processor_function", "pkg.mod:Other"])
    assert server.body["custom_logit_processor"] == [Shout.to_str(), "pkg.mod:Other"]
    eng.freeze_gc()
    assert server.requests[-1].method == "POST" and server.requests[-1].url.path == "/freeze_gc"
    with pytest.raises(TypeError, match="name"):
        eng.register_custom_logit_processor("", Shout)
