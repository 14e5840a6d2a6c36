"""OpenAI request bodies -> the engine's arguments, without an engine: types, the field a 400
names, the sampling-parameter mapping, response_format, usage and logprob shapes."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from treadle.runtime.sampling_params import SamplingParams
from treadle.server.errors import APIError
from treadle.server.openai_completions import engine_kwargs
from treadle.server.openai_logprobs import chat_logprobs, completion_logprobs, merge_completion_logprobs
from treadle.server.openai_protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, parse_body
from treadle.server.openai_sampling import as_openai_error, check_model, finish_reason, sampling_params, usage


def _err(model, body) -> APIError:
    with pytest.raises(APIError) as e:
        parse_body(model, body)
    assert e.value.status == 400
    return e.value


def test_wrong_types_name_the_field():
    assert _err(CompletionRequest, {"prompt": "x", "max_tokens": "many"}).param == "max_tokens"
    assert _err(CompletionRequest, {"prompt": {"a": 1}}).param == "prompt"
    assert _err(CompletionRequest, {}).param == "prompt"
    assert _err(ChatCompletionRequest, {"messages": [{"role": "bot"}]}).param == "messages.0.role"
    assert _err(ChatCompletionRequest, {"messages": "hi"}).param == "messages"
    assert _err(ChatCompletionRequest, {"messages": [], "stream_options": {"include_usage": "x"}}).param \
        == "stream_options.include_usage"
    assert _err(ChatCompletionRequest, {"messages": [], "response_format": {"type": "xml"}}).param \
        == "response_format.type"
    assert _err(EmbeddingRequest, {"input": 3.5}).param == "input"
    # strict types, as OpenAI's own server: no quietly converted strings or bools
    assert _err(CompletionRequest, {"prompt": "x", "max_tokens": "5"}).param == "max_tokens"
    assert _err(CompletionRequest, {"prompt": "x", "stream": "yes"}).param == "stream"
    assert _err(CompletionRequest, {"prompt": "x", "n": True}).param == "n"
    assert parse_body(CompletionRequest, {"prompt": "x", "temperature": 1}).temperature == 1.0  # an int is a number


def test_unknown_fields_are_ignored_and_prompt_forms_accepted():
    for prompt in ("a", ["a", "b"], [1, 2], [[1, 2], [3]]):
        assert parse_body(CompletionRequest, {"prompt": prompt, "no_such": 1}).prompt == prompt
    kw, prompts = engine_kwargs(parse_body(CompletionRequest, {"prompt": [1, 2]}))
    assert kw["input_ids"] == [[1, 2]] and prompts == [[1, 2]]
    kw, prompts = engine_kwargs(parse_body(CompletionRequest, {"prompt": "hi", "logprobs": 2, "echo": True}))
    assert kw["prompt"] == ["hi"] and kw["return_logprob"] and kw["top_logprobs_num"] == 2
    assert kw["logprob_start_len"] == 0 and kw["sampling_params"]["max_new_tokens"] == 16


def test_sampling_params_mapping_is_accepted_by_the_engine():
    req = parse_body(ChatCompletionRequest, {
        "messages": [], "n": 2, "stop": ["\n"], "seed": 7, "temperature": 0.5, "top_p": 0.9,
        "frequency_penalty": 0.1, "presence_penalty": 0.2, "logit_bias": {"5": -100}, "top_k": 4, "min_p": 0.05,
        "repetition_penalty": 1.1, "regex": "[a-z]+", "ignore_eos": True, "skip_special_tokens": False,
        "min_tokens": 2, "stop_token_ids": [2]})
    p = sampling_params(req, 10)
    assert p == {"max_new_tokens": 10, "n": 2, "temperature": 0.5, "top_p": 0.9, "frequency_penalty": 0.1,
                 "presence_penalty": 0.2, "top_k": 4, "min_p": 0.05, "repetition_penalty": 1.1, "regex": "[a-z]+",
                 "stop": ["\n"], "stop_token_ids": [2], "logit_bias": {"5": -100}, "ignore_eos": True,
                 "skip_special_tokens": False, "min_new_tokens": 2, "sampling_seed": 7}
    SamplingParams(**p).verify()  # every name is the engine's


def test_negative_max_tokens_and_bad_n():
    req = parse_body(ChatCompletionRequest, {"messages": []})
    with pytest.raises(APIError) as e:
        sampling_params(req, -1, "max_completion_tokens")
    assert e.value.param == "max_completion_tokens"
    with pytest.raises(APIError) as e:
        sampling_params(parse_body(CompletionRequest, {"prompt": "x", "n": 0}), 4)
    assert e.value.param == "n"


def test_response_format():
    def params(fmt):
        return sampling_params(parse_body(ChatCompletionRequest, {"messages": [], "response_format": fmt}), 4)
    assert json.loads(params({"type": "json_object"})["json_schema"]) == {"type": "object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert json.loads(params({"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
                      ["json_schema"]) == schema
    assert "json_schema" not in params({"type": "text"})
    for bad in ({"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": 12}}},
                {"type": "json_schema", "json_schema": {"name": "s"}}):
        with pytest.raises(APIError) as e:
            params(bad)
        assert e.value.param == "response_format" and e.value.status == 400


def test_model_must_be_the_served_one():
    state = SimpleNamespace(served_model_name="m")
    check_model(state, "m")
    check_model(state, None)
    with pytest.raises(APIError) as e:
        check_model(state, "gpt-4")
    assert (e.value.status, e.value.param, e.value.code) == (404, "model", "model_not_found")


def test_usage_counts_the_prompt_once_per_prompt_and_finish_reasons():
    metas = [{"prompt_tokens": 5, "completion_tokens": 3}, {"prompt_tokens": 5, "completion_tokens": 4},
             {"prompt_tokens": 2, "completion_tokens": 1}, {"prompt_tokens": 2, "completion_tokens": 1}]
    assert usage(metas, 2) == {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16}
    assert finish_reason({"finish_reason": {"type": "length", "length": 3}}) == "length"
    assert finish_reason({"finish_reason": {"type": "stop", "matched": 2}}, tool_calls=True) == "tool_calls"
    assert finish_reason({"finish_reason": None}) is None


def test_logprob_shapes():
    names = {5: "Hello", 6: " world", 7: "!"}.get
    toks, tops = [[-0.1, 5, None], [-0.2, 6, None]], [[[-0.1, 5, None], [-2.0, 7, None]], [[-0.2, 6, None]]]
    lp = completion_logprobs(toks, tops, names, offset=3)
    assert lp == {"tokens": ["Hello", " world"], "token_logprobs": [-0.1, -0.2],
                  "top_logprobs": [{"Hello": -0.1, "!": -2.0}, {" world": -0.2}], "text_offset": [3, 8]}
    assert completion_logprobs(toks, None, names)["top_logprobs"] is None
    echoed = completion_logprobs([[None, 7, None]], None, names)
    merged = merge_completion_logprobs(echoed, completion_logprobs(toks, tops, names, 1))
    assert merged["tokens"] == ["!", "Hello", " world"] and merged["top_logprobs"][0] is None
    chat = chat_logprobs(toks, tops, names)
    assert chat["content"][0] == {"token": "Hello", "logprob": -0.1, "bytes": list(b"Hello"), "top_logprobs": [
        {"token": "Hello", "logprob": -0.1, "bytes": list(b"Hello")}, {"token": "!", "logprob": -2.0, "bytes": [33]}]}


def test_engine_errors_name_the_clients_field():
    e = as_openai_error(ValueError("max_new_tokens must be at least 0, got -3."))
    assert (e.status, e.param, e.message) == (400, "max_tokens", "max_tokens must be at least 0, got -3.")
    assert as_openai_error(ValueError("sampling_seed must be an int")).param == "seed"
    assert as_openai_error(ValueError("top_p must be in (0, 1], got 7.")).param == "top_p"
    assert as_openai_error(TypeError("Unexpected keyword argument 'x'")).param is None
