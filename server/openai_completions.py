"""``POST /v1/completions``: OpenAI's legacy completions over ``Engine.async_generate``.

All prompts and their ``n`` samples go to the engine as one batch call (results come back
prompt-major, so choice ``i*n + j`` is sample ``j`` of prompt ``i``). A client that goes away
aborts the call: ``unless_disconnected`` for a whole answer, the closed stream for SSE.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from fastapi import Request, Response

from treadle.server.chat_template import ServerTokenizer, server_tokenizer
from treadle.server.errors import APIError
from treadle.server.http_utils import SSE_DONE, json_response, sse_event, sse_response, timed_engine_call
from treadle.server.metrics import RequestTimer, outcome_of
from treadle.server.openai_logprobs import completion_logprobs, merge_completion_logprobs
from treadle.server.openai_protocol import CompletionRequest
from treadle.server.openai_sampling import (as_openai_error, check_model, check_serving, check_top_logprobs,
                                            finish_reason, matched_stop, new_id, now, sampling_params, usage)

DEFAULT_MAX_TOKENS = 16  # OpenAI's and SGLang's default for completions


def _prompts(prompt: Any) -> tuple[dict[str, Any], list[Any]]:
    """The engine's prompt argument (text or ids, always a batch) and the prompts one by one."""
    if isinstance(prompt, str):
        return {"prompt": [prompt]}, [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty.", "prompt")
    if isinstance(prompt[0], str):
        return {"prompt": list(prompt)}, list(prompt)
    if isinstance(prompt[0], int):
        return {"input_ids": [list(prompt)]}, [list(prompt)]
    return {"input_ids": [list(p) for p in prompt]}, [list(p) for p in prompt]


def engine_kwargs(req: CompletionRequest) -> tuple[dict[str, Any], list[Any]]:
    if req.suffix:
        raise APIError(400, "suffix is not supported.", "suffix")
    check_top_logprobs(req.logprobs, "logprobs")
    max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    kwargs, prompts = _prompts(req.prompt)
    kwargs["sampling_params"] = sampling_params(req, max_tokens)
    if req.logprobs is not None:
        kwargs["return_logprob"] = True
        kwargs["top_logprobs_num"] = req.logprobs
        if req.echo:
            kwargs["logprob_start_len"] = 0
    for name in ("lora_path", "priority", "rid"):
        if getattr(req, name) is not None:
            kwargs[name] = getattr(req, name)
    return kwargs, prompts


async def create_completion(request: Request, req: CompletionRequest) -> Response:
    state = request.app.state
    check_model(state, req.model)
    kwargs, prompts = engine_kwargs(req)
    check_serving(state)
    tok = await server_tokenizer(state) if (req.logprobs is not None or req.echo) else None
    timer = state.metrics.timer()
    out = await timed_engine_call(request, timer, state.engine.async_generate(stream=req.stream, **kwargs),
                                  as_openai_error)
    if out is None:  # the client went away: its request was aborted
        return Response(status_code=499)
    if req.stream:
        return sse_response(_stream(out, req, prompts, tok, timer, state.served_model_name))
    results = list(out)
    metas = [r["meta_info"] for r in results]
    timer.whole_result(metas)
    choices = [_choice(i, r, req, prompts[i // req.n], tok) for i, r in enumerate(results)]
    return json_response({"id": new_id("cmpl"), "object": "text_completion", "created": now(),
                          "model": state.served_model_name, "choices": choices, "usage": usage(metas, req.n)})


def _echo_text(prompt: Any, tok: ServerTokenizer) -> str:
    return prompt if isinstance(prompt, str) else tok.decode(prompt)


def _choice(index: int, result: dict[str, Any], req: CompletionRequest, prompt: Any,
            tok: ServerTokenizer | None) -> dict[str, Any]:
    meta = result["meta_info"]
    prefix = _echo_text(prompt, tok) if req.echo else ""
    logprobs = None
    if req.logprobs is not None:
        logprobs = completion_logprobs(meta.get("output_token_logprobs") or [],
                                       meta.get("output_top_logprobs") if req.logprobs else None,
                                       tok.token_text, len(prefix))
        if req.echo:
            echoed = completion_logprobs(meta.get("input_token_logprobs") or [],
                                         meta.get("input_top_logprobs") if req.logprobs else None, tok.token_text)
            logprobs = merge_completion_logprobs(echoed, logprobs)
    return {"index": index, "text": prefix + result["text"], "logprobs": logprobs,
            "finish_reason": finish_reason(meta), "matched_stop": matched_stop(meta)}


async def _stream(chunks: AsyncIterator[dict[str, Any]], req: CompletionRequest, prompts: list[Any],
                  tok: ServerTokenizer | None, timer: RequestTimer, model: str) -> AsyncIterator[bytes]:
    """OpenAI's completion chunks, one per engine chunk; with ``include_usage`` a last chunk with
    the usage and no choices. Closing this generator closes the engine's stream (an abort)."""
    rid, created = new_id("cmpl"), now()
    metas: dict[int, dict[str, Any]] = {}
    offsets: dict[int, int] = {}
    outcome = "error"

    def chunk(index: int, text: str, logprobs: Any = None, reason: Any = None) -> bytes:
        return sse_event({"id": rid, "object": "text_completion", "created": created, "model": model,
                          "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}]})

    try:
        if req.echo:
            for i in range(len(prompts) * req.n):
                text = _echo_text(prompts[i // req.n], tok)
                offsets[i] = len(text)
                yield chunk(i, text)
        async for c in chunks:
            i = int(c.get("index", 0) or 0)
            meta = c.get("meta_info") or {}
            timer.tokens(int(meta.get("completion_tokens", 0)) - int((metas.get(i) or {}).get("completion_tokens", 0)))
            metas[i] = meta
            logprobs = None
            if req.logprobs is not None:
                logprobs = completion_logprobs(meta.get("output_token_logprobs") or [],
                                               meta.get("output_top_logprobs") if req.logprobs else None,
                                               tok.token_text, offsets.get(i, 0))
            offsets[i] = offsets.get(i, 0) + len(c.get("text", ""))
            yield chunk(i, c.get("text", ""), logprobs, finish_reason(meta))
        ordered = [metas[i] for i in sorted(metas)]
        if req.stream_options is not None and req.stream_options.include_usage:
            yield sse_event({"id": rid, "object": "text_completion", "created": created, "model": model,
                             "choices": [], "usage": usage(ordered, req.n)})
        outcome = outcome_of(ordered)
        yield SSE_DONE
    except (asyncio.CancelledError, GeneratorExit):
        outcome = "abort"
        raise
    finally:
        await chunks.aclose()
        timer.done_with(outcome, list(metas.values()))
