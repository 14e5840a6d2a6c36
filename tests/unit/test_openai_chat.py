"""Chat completions without an engine: messages -> the template's token ids (the model's own
template, ``--chat-template``, template kwargs), and generated text -> ``message`` / stream
deltas through the reasoning and tool-call parsers (fake model output)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from treadle.server.chat_template import ServerTokenizer, load_template
from treadle.server.errors import APIError
from treadle.server.openai_chat import template_messages
from treadle.server.openai_chat_output import ChatParsers
from treadle.server.openai_protocol import ChatCompletionRequest, parse_body

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


def _req(**body) -> ChatCompletionRequest:
    return parse_body(ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}], **body})


@pytest.fixture(scope="module")
def tok_dir() -> str:
    from treadle.runtime.model_files import resolve_model_files

    return resolve_model_files("default").tokenizer_dir


@pytest.fixture(scope="module")
def server_tok(tok_dir) -> ServerTokenizer:
    return ServerTokenizer(tok_dir)


def test_template_messages_flatten_parts_and_tool_calls():
    req = _req(messages=[
        {"role": "developer", "content": "Be terse."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"}])
    msgs, images = template_messages(req)
    assert images == []
    assert msgs[0] == {"role": "system", "content": "Be terse."}
    assert msgs[1]["content"] == "a\nb" and msgs[2]["content"] == ""
    assert msgs[2]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert msgs[3] == {"role": "tool", "content": "42", "tool_call_id": "call_1"}
    with pytest.raises(APIError) as e:
        template_messages(_req(messages=[{"role": "user", "content": [{"type": "text", "text": "x"},
                                                                       {"type": "image_url", "image_url": {}}]}]))
    assert e.value.param == "messages.0.content.1"


def test_image_parts_become_placeholders_and_image_data():
    url = "data:image/png;base64,iVBORw0KGgo="
    msgs, images = template_messages(_req(messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]}]))
    assert images == [url]
    assert msgs[0]["content"] == [{"type": "text", "text": "What is this?"}, {"type": "image"}]


def test_render_is_the_models_template(server_tok, tok_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dir)
    msgs = [{"role": "user", "content": "Hello"}]
    assert server_tok.render(msgs) == list(hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                                  return_dict=False))
    without = server_tok.render(msgs, add_generation_prompt=False)
    assert len(without) < len(server_tok.render(msgs))
    partial = server_tok.render(msgs + [{"role": "assistant", "content": "The answer is"}],
                                continue_final_message=True)
    assert server_tok.decode(partial).rstrip().endswith("The answer is")


def test_chat_template_override_and_kwargs(tok_dir, tmp_path):
    template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if flag %}!{% endif %}"
    tok = ServerTokenizer(tok_dir, template, default_kwargs={"flag": False})
    assert tok.decode(tok.render([{"role": "user", "content": "x"}])) == "[user]x"
    assert tok.decode(tok.render([{"role": "user", "content": "x"}], template_kwargs={"flag": True})) == "[user]x!"
    path = tmp_path / "t.jinja"
    path.write_text(template)
    assert load_template(str(path)) == template
    (tmp_path / "t.json").write_text(json.dumps({"chat_template": template}))
    assert load_template(str(tmp_path / "t.json")) == template
    with pytest.raises(ValueError, match="chat_template"):
        load_template("no-such-template-name")
    broken = ServerTokenizer(tok_dir, "{{ raise_exception('no system role') }}")
    with pytest.raises(APIError) as e:
        broken.render([{"role": "system", "content": "x"}])
    assert e.value.status == 400 and e.value.param == "messages"


def _args(**kw) -> SimpleNamespace:
    return SimpleNamespace(reasoning_parser=kw.get("reasoning"), tool_call_parser=kw.get("tools"))


def test_reasoning_and_tool_calls_in_the_whole_message():
    text = "<think>The user wants weather.</think>\n<tool_call>\n{\"name\": \"get_weather\", " \
           "\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"
    parsers = ChatParsers.for_request(_args(reasoning="qwen3", tools="hermes"), _req(tools=TOOLS), TOOLS)
    msg, has_calls = parsers.message(text)
    assert has_calls and msg["reasoning_content"] == "The user wants weather."
    assert msg["content"] is None
    (call,) = msg["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    # separate_reasoning false keeps the block in the content; tool_choice none switches parsing off
    keep = ChatParsers.for_request(_args(reasoning="qwen3"), _req(separate_reasoning=False), None)
    assert keep.message("<think>x</think>y")[0] == {"role": "assistant", "content": "<think>x</think>y"}
    off = ChatParsers.for_request(_args(tools="hermes"), _req(tools=TOOLS, tool_choice="none"), TOOLS)
    assert off.tools is None
    # a template that opened <think> in the prompt: the output starts inside the block
    forced = ChatParsers.for_request(_args(reasoning="qwen3"), _req(), None,
                                     prompt_tail="<|im_start|>assistant\n<think>\n")
    assert forced.message("hmm</think>Hi")[0] == {"role": "assistant", "content": "Hi", "reasoning_content": "hmm"}


def test_llama3_tool_call_streamed_as_openai_deltas():
    text = '{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    parsers = ChatParsers.for_request(_args(tools="llama3"), _req(tools=TOOLS), TOOLS)
    assert parsers.message(text)[1]
    s = parsers.streamer()
    deltas = [d for d in (s.feed(text[i:i + 5]) for i in range(0, len(text), 5)) if d] + [d for d in [s.finish()] if d]
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert all("content" not in d for d in deltas) and s.has_calls
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    assert all("id" not in c for c in calls[1:]) and {c["index"] for c in calls} == {0}
    assert "".join(c["function"].get("name", "") for c in calls) == "get_weather"
    assert json.loads("".join(c["function"].get("arguments", "") for c in calls)) == {"city": "Oslo"}


def test_streamed_reasoning_then_content():
    parsers = ChatParsers.for_request(_args(reasoning="deepseek-r1"), _req(), None)
    s = parsers.streamer()
    text = "Let me think.</think>\n\nThe answer is 4."
    deltas = [s.feed(text[i:i + 3]) for i in range(0, len(text), 3)] + [s.finish()]
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas if d)
    content = "".join(d.get("content", "") for d in deltas if d)
    assert (reasoning, content) == ("Let me think.", "The answer is 4.")
    assert not s.has_calls
