"""``POST /v1/chat/completions``: messages through the chat template (in the server, so the
engine gets exact ``input_ids``), then ``Engine.async_generate`` with ``n`` samples in one call,
the output split into content, ``reasoning_content`` and ``tool_calls`` by the server's parsers.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Optional

from fastapi import Request, Response

from treadle.server.chat_template import ServerTokenizer, server_tokenizer
from treadle.server.errors import APIError
from treadle.server.http_utils import SSE_DONE, json_response, sse_event, sse_response, timed_engine_call
from treadle.server.metrics import RequestTimer, outcome_of
from treadle.server.openai_chat_output import ChatParsers
from treadle.server.openai_logprobs import chat_logprobs
from treadle.server.openai_protocol import ChatCompletionRequest
from treadle.server.openai_sampling import (as_openai_error, check_model, check_serving, check_top_logprobs,
                                            finish_reason, matched_stop, new_id, now, sampling_params, usage)

PROMPT_TAIL = 8  # tokens at the end of a rendered prompt in which a template may open <think>


def template_messages(req: ChatCompletionRequest) -> tuple[list[dict[str, Any]], list[str]]:
    """OpenAI's messages as Hugging Face chat templates expect them, and the images they hold.

    Text parts are joined into one string (text-only templates take a string); a message with
    ``image_url`` parts keeps its parts, each image as ``{"type": "image"}`` (what multimodal
    templates such as LLaVA's render as the ``<image>`` placeholder the engine expands) and its
    URL (http, file or base64 data URL) into the returned list, the engine's ``image_data``.
    Tool-call arguments become dicts, ``developer`` becomes ``system``."""
    out, images = [], []
    for i, m in enumerate(req.messages):
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
        content = m.content
        if isinstance(content, list):
            content = _content_parts(content, f"messages.{i}.content", images)
        msg["content"] = content if content is not None else ""
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            msg["tool_calls"] = [_template_call(c) for c in m.tool_calls]
        out.append(msg)
    if not out:
        raise APIError(400, "messages must not be empty.", "messages")
    return out, images


def _content_parts(parts: list[dict[str, Any]], where: str, images: list[str]) -> Any:
    texts, with_images = [], []
    for j, part in enumerate(parts):
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
            with_images.append({"type": "text", "text": part["text"]})
        elif kind == "image_url" and isinstance((part.get("image_url") or {}).get("url"), str):
            images.append(part["image_url"]["url"])
            with_images.append({"type": "image"})
        else:
            raise APIError(400, f"{where}.{j}: a content part must be {{'type': 'text', 'text': str}} or "
                                f"{{'type': 'image_url', 'image_url': {{'url': str}}}}, got {kind!r}.", f"{where}.{j}")
    return with_images if len(with_images) > len(texts) else "\n".join(texts)


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    fn = dict(call.get("function") or {})
    if isinstance(fn.get("arguments"), str):
        try:
            fn["arguments"] = json.loads(fn["arguments"])
        except json.JSONDecodeError:
            pass
    return {**call, "function": fn}


def _tools(req: ChatCompletionRequest) -> Optional[list[dict[str, Any]]]:
    if not req.tools or req.tool_choice == "none":
        return None
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    if isinstance(req.tool_choice, dict):
        name = (req.tool_choice.get("function") or {}).get("name")
        if name not in {t["function"]["name"] for t in tools}:
            raise APIError(400, f"tool_choice names the function {name!r}, which is not in tools.", "tool_choice")
    return tools


async def create_chat_completion(request: Request, req: ChatCompletionRequest) -> Response:
    state = request.app.state
    check_model(state, req.model)
    check_top_logprobs(req.top_logprobs, "top_logprobs")
    max_field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    params = sampling_params(req, req.max_completion_tokens if req.max_completion_tokens is not None
                             else req.max_tokens, max_field)
    tools = _tools(req)
    check_serving(state)
    tok = await server_tokenizer(state)
    messages, images = template_messages(req)
    ids = tok.render(messages, tools, req.add_generation_prompt, req.continue_final_message, req.chat_template_kwargs)
    parsers = ChatParsers.for_request(state.engine.server_args, req, tools, tok.decode(ids[-PROMPT_TAIL:]))
    if req.tool_choice not in (None, "auto", "none") and tools:
        if parsers.tools is None:
            raise APIError(400, "tool_choice 'required' or a named function needs the server's --tool-call-parser.",
                           "tool_choice")
        params.update(parsers.tools.constraint(req.tool_choice) or {})
    kwargs: dict[str, Any] = {"input_ids": [ids], "sampling_params": params}
    if images:
        kwargs["image_data"] = [images]
    if req.logprobs:
        kwargs.update(return_logprob=True, top_logprobs_num=req.top_logprobs or 0)
    for name in ("lora_path", "priority", "rid"):
        if getattr(req, name) is not None:
            kwargs[name] = getattr(req, name)
    timer = state.metrics.timer()
    out = await timed_engine_call(request, timer, state.engine.async_generate(stream=req.stream, **kwargs),
                                  as_openai_error)
    if out is None:  # the client went away: its request was aborted
        return Response(status_code=499)
    if req.stream:
        return sse_response(_stream(out, req, parsers, tok, timer, state.served_model_name))
    results = list(out)
    metas = [r["meta_info"] for r in results]
    timer.whole_result(metas)
    choices = []
    for i, r in enumerate(results):
        message, has_calls = parsers.message(r["text"])
        meta = r["meta_info"]
        logprobs = chat_logprobs(meta.get("output_token_logprobs") or [],
                                 meta.get("output_top_logprobs"), tok.token_text) if req.logprobs else None
        choices.append({"index": i, "message": message, "logprobs": logprobs,
                        "finish_reason": finish_reason(meta, has_calls), "matched_stop": matched_stop(meta)})
    return json_response({"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(),
                          "model": state.served_model_name, "choices": choices, "usage": usage(metas, req.n)})


async def _stream(chunks: AsyncIterator[dict[str, Any]], req: ChatCompletionRequest, parsers: ChatParsers,
                  tok: ServerTokenizer, timer: RequestTimer, model: str) -> AsyncIterator[bytes]:
    """OpenAI's chunks: a first ``{"role": "assistant"}`` delta per choice, content / reasoning /
    tool-call deltas, a last delta with ``finish_reason``; with ``include_usage`` a final chunk
    with ``usage`` and no choices. Closing this generator aborts the engine's request."""
    rid, created = new_id("chatcmpl"), now()
    metas: dict[int, dict[str, Any]] = {}
    streamers = {i: parsers.streamer() for i in range(req.n)}
    outcome = "error"

    def event(index: int, delta: dict[str, Any], logprobs: Any = None, reason: Any = None) -> bytes:
        return sse_event({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                          "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                       "finish_reason": reason}]})

    try:
        for i in range(req.n):
            yield event(i, {"role": "assistant", "content": ""})
        async for c in chunks:
            i = int(c.get("index", 0) or 0)
            meta = c.get("meta_info") or {}
            timer.tokens(int(meta.get("completion_tokens", 0)) - int((metas.get(i) or {}).get("completion_tokens", 0)))
            metas[i] = meta
            s = streamers[i]
            delta = s.feed(c.get("text", "")) if c.get("text") else None
            logprobs = chat_logprobs(meta.get("output_token_logprobs") or [], meta.get("output_top_logprobs"),
                                     tok.token_text) if req.logprobs else None
            if delta is not None or logprobs is not None and logprobs["content"]:
                yield event(i, delta or {}, logprobs)
            if meta.get("finish_reason") is not None:
                last = s.finish()
                if last is not None:
                    yield event(i, last)
                yield event(i, {}, None, finish_reason(meta, s.has_calls))
        ordered = [metas[i] for i in sorted(metas)]
        if req.stream_options is not None and req.stream_options.include_usage:
            yield sse_event({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                             "choices": [], "usage": usage(ordered, req.n)})
        outcome = outcome_of(ordered)
        yield SSE_DONE
    except (asyncio.CancelledError, GeneratorExit):
        outcome = "abort"
        raise
    finally:
        await chunks.aclose()
        timer.done_with(outcome, list(metas.values()))
