"""Issue 22, acceptance 1 and 3 for OpenAI's API: the official ``openai`` client against the
server (``serve_in_thread``) over the module's default-model engine; greedy HTTP output equal
to the in-process engine's, token for token; bad requests -> OpenAI's error shape, and the
server keeps serving."""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import openai
import pytest

from serve_helpers import serve_in_thread
from treadle import Engine

pytestmark = pytest.mark.e2e

MODEL = "smol"
GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def engine():
    # the chat parsers are server arguments the Engine accepts and leaves to `treadle serve`
    eng = Engine(model_path="default", random_seed=0, tool_call_parser="hermes", reasoning_parser="qwen3")
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def url(engine):
    with serve_in_thread(engine, MODEL) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def chat_ids(url):
    """The prompt ids the server's chat template gives (the transformers tokenizer of the model)."""
    from transformers import AutoTokenizer

    from treadle.runtime.model_files import resolve_model_files

    tok = AutoTokenizer.from_pretrained(resolve_model_files("default").tokenizer_dir)
    return lambda messages: list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                         return_dict=False))


def test_models_list(client, engine):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["max_model_len"] == engine.get_server_info()["context_length"]


PROMPT = "The capital of France is"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def completion_ref(engine):
    """The in-process engine's greedy answer the HTTP answers must equal (one run for the module)."""
    return engine.generate(prompt=PROMPT, sampling_params={"max_new_tokens": 8, **GREEDY}, return_logprob=True)


@pytest.fixture(scope="module")
def chat_ref(engine, chat_ids):
    return engine.generate(input_ids=chat_ids(CHAT), sampling_params={"max_new_tokens": 6, **GREEDY},
                           return_logprob=True)


def test_completion_equals_in_process_greedy_token_for_token(client, completion_ref):
    ref = completion_ref
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, logprobs=0, **GREEDY)
    choice = out.choices[0]
    assert choice.text == ref["text"]
    ref_lps = [lp for lp, _, _ in ref["meta_info"]["output_token_logprobs"]]
    assert choice.logprobs.token_logprobs == pytest.approx(ref_lps, abs=1e-4)
    assert "".join(choice.logprobs.tokens) == ref["text"]
    assert out.usage.prompt_tokens == ref["meta_info"]["prompt_tokens"]
    assert out.usage.completion_tokens == ref["meta_info"]["completion_tokens"] == 8
    assert choice.finish_reason == "length" and out.id.startswith("cmpl-") and out.model == MODEL


def test_completion_stream_equals_in_process(client, completion_ref):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, stream=True, logprobs=0,
                                            **GREEDY))
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == completion_ref["text"]
    lps = [lp for c in chunks for lp in c.choices[0].logprobs.token_logprobs]
    assert lps == pytest.approx([lp for lp, _, _ in completion_ref["meta_info"]["output_token_logprobs"]], abs=1e-4)
    offsets = [o for c in chunks for o in c.choices[0].logprobs.text_offset]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completion_token_prompts_batch_and_echo(client, engine):
    ids = [[1, 504, 3458, 282], [1, 2, 3]]
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, echo=True, **GREEDY)
    ref = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 4, **GREEDY})
    assert [c.index for c in out.choices] == [0, 1]
    for choice, r in zip(out.choices, ref):
        assert choice.text.endswith(r["text"]) and len(choice.text) > len(r["text"])
    assert out.usage.prompt_tokens == 7


def test_completion_top_logprobs(client):
    out = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=3, logprobs=2, **GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    for tok, top, value in zip(lp.tokens, lp.top_logprobs, lp.token_logprobs):
        assert len(top) == 2 and tok in top and top[tok] == pytest.approx(value)
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])


def test_chat_equals_in_process_greedy(client, chat_ref, chat_ids):
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, logprobs=True, top_logprobs=2,
                                         **GREEDY)
    msg = out.choices[0].message
    assert msg.role == "assistant" and msg.content == chat_ref["text"]
    content = out.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(
        [lp for lp, _, _ in chat_ref["meta_info"]["output_token_logprobs"]], abs=1e-4)
    assert all(len(c.top_logprobs) == 2 for c in content)
    assert out.usage.prompt_tokens == len(chat_ids(CHAT))
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"


def test_chat_stream_with_usage(client, chat_ref):
    messages = [CHAT[0], {"role": "user", "content": [{"type": "text", "text": CHAT[1]["content"]}]}]  # text parts
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=6,
                                                 stream=True, stream_options={"include_usage": True}, logprobs=True,
                                                 **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat_ref["text"]
    lps = [t.logprob for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert lps == pytest.approx([lp for lp, _, _ in chat_ref["meta_info"]["output_token_logprobs"]], abs=1e-4)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 6
    assert last.usage.prompt_tokens == chat_ref["meta_info"]["prompt_tokens"]


def test_n_samples(client, chat_ids):
    messages = [{"role": "user", "content": "Hi"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, n=2, max_tokens=4, **GREEDY)
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].message.content == out.choices[1].message.content  # greedy: the same
    assert out.usage.prompt_tokens == len(chat_ids(messages))  # the prompt counted once
    assert out.usage.completion_tokens == 2 * 4
    kw = dict(model=MODEL, prompt="Hi", n=2, max_tokens=3, temperature=1.0, seed=3)
    sampled, again = client.completions.create(**kw), client.completions.create(**kw)
    assert len(sampled.choices) == 2 and [c.text for c in sampled.choices] == [c.text for c in again.choices]


def test_json_schema_response_format(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "age"], "additionalProperties": False}
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a person as JSON."}], max_tokens=32,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}, **GREEDY)
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)
    # response_format is not OpenAI's field of completions, but SGLang's server takes it there too
    obj = client.completions.create(model=MODEL, prompt="JSON:", max_tokens=4,
                                    extra_body={"response_format": {"type": "json_object"}}, **GREEDY)
    assert obj.choices[0].text.lstrip().startswith("{")


def _error(r: httpx.Response, status: int, param) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    return err


def test_bad_requests_name_the_field_and_the_server_keeps_serving(url, client):
    post = lambda path, body: httpx.post(f"{url}/v1/{path}", json=body, timeout=30)  # noqa: E731
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
    _error(post("chat/completions", {**chat, "model": "gpt-4"}), 404, "model")
    _error(post("completions", {"model": MODEL, "prompt": "x", "max_tokens": -1}), 400, "max_tokens")
    _error(post("chat/completions", {**chat, "max_completion_tokens": -5}), 400, "max_completion_tokens")
    _error(post("completions", {"model": MODEL, "prompt": "x", "max_tokens": "many"}), 400, "max_tokens")
    _error(post("chat/completions", {**chat, "temperature": "hot"}), 400, "temperature")
    _error(post("chat/completions", {**chat, "messages": [{"role": "robot", "content": "x"}]}), 400, "messages.0.role")
    _error(post("completions", {"model": MODEL}), 400, "prompt")
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}
    _error(post("chat/completions", {**chat, "response_format": bad_schema}), 400, "response_format")
    _error(post("chat/completions", {**chat, "top_p": 7}), 400, "top_p")  # the engine's own check
    # the engine's min_new_tokens check, named as the client sent it
    _error(post("completions", {"model": MODEL, "prompt": "x", "max_tokens": 2, "min_tokens": 5}), 400, "min_tokens")
    r = httpx.post(f"{url}/v1/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    # still serving, and SGLang's extras are accepted, unknown fields ignored
    ok = post("completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "top_k": 5, "min_p": 0.1,
                              "repetition_penalty": 1.1, "priority": 0, "no_such_field": 1, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 3


PING = [{"type": "function", "function": {"name": "ping", "description": "Check the network"}}]


def test_tool_choice_forces_a_call_streamed_as_tool_call_deltas(client):
    """The named function's grammar (C's parser) forces the call; the hermes parser turns the
    streamed text into OpenAI tool-call deltas (the whole-message path: tests/unit/test_openai_chat.py).
    SmolLM2 spells the call nearly a character a token: about 42 tokens."""
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Is the network up?"}], tools=PING,
        tool_choice={"type": "function", "function": {"name": "ping"}}, max_tokens=64, stream=True, **GREEDY))
    calls = [c for ch in chunks if ch.choices for c in (ch.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].id.startswith("call_") and calls[0].type == "function"
    assert "".join(c.function.name or "" for c in calls) == "ping"
    assert json.loads("".join(c.function.arguments or "" for c in calls)) == {}
    assert not "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"


def _running(engine) -> int:
    return sum(s.get("num_running", 0) + s.get("num_waiting", 0)
               for s in engine.get_server_info().get("internal_states") or [])


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_aborts_its_request(url, engine, stream):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 2000,
            "ignore_eos": True, "stream": stream}
    with httpx.Client(timeout=30) as http:
        if stream:
            with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                lines = r.iter_lines()
                assert all(next(lines) is not None for _ in range(6))  # the role chunk and some tokens came
                assert _running(engine) == 1  # still generating while the client reads
        else:
            with pytest.raises(httpx.ReadTimeout):
                http.post(f"{url}/v1/chat/completions", json=body, timeout=3)
    deadline = time.monotonic() + 10
    while _running(engine) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _running(engine) == 0


def test_requests_are_timed_in_the_apps_metrics(engine):
    from fastapi.testclient import TestClient

    from treadle.server.app import create_app

    app = create_app(engine, MODEL)
    with TestClient(app) as http:
        r1 = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "temperature": 0})
        r2 = http.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 3, "temperature": 0, "n": 2,
                                                     "messages": [{"role": "user", "content": "Hi"}]})
        assert http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "top_p": 9}).status_code == 400
    assert r1.status_code == r2.status_code == 200
    value = app.state.metrics.registry.get_sample_value
    assert value("treadle:num_requests_total", {"model_name": MODEL, "outcome": "success"}) == 2
    assert value("treadle:num_requests_total", {"model_name": MODEL, "outcome": "error"}) == 1
    generated = 2 + r2.json()["usage"]["completion_tokens"]
    assert value("treadle:generation_tokens_total", {"model_name": MODEL}) == generated
    assert value("treadle:time_to_first_token_seconds_count", {"model_name": MODEL}) == 2


def test_reasoning_parser_after_a_prefilled_think_tag(client):
    """The engine has reasoning_parser="qwen3"; an assistant turn continued from ``<think>``
    (continue_final_message) leaves the output inside the block, so it all goes to
    reasoning_content, and ``separate_reasoning: false`` keeps it in content instead."""
    kw = dict(model=MODEL, max_tokens=4, **GREEDY, messages=[
        {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "<think>"}])
    raw = client.chat.completions.create(**kw, extra_body={"continue_final_message": True,
                                                           "separate_reasoning": False}).choices[0].message
    split = client.chat.completions.create(**kw, extra_body={"continue_final_message": True}).choices[0].message
    assert raw.content and not getattr(raw, "reasoning_content", None)
    assert split.model_extra["reasoning_content"] == raw.content.strip() and not split.content
