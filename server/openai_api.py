"""OpenAI's API: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/embeddings``, ``/v1/models``.

This module is only the router: each body is read as JSON (400 when malformed), validated by
its pydantic model (400 naming the field), and handed to the module doing the work.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from treadle.server.http_utils import read_json
from treadle.server.openai_chat import create_chat_completion
from treadle.server.openai_completions import create_completion
from treadle.server.openai_embeddings import create_embeddings
from treadle.server.openai_protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, parse_body

router = APIRouter()
_CREATED = int(time.time())


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await create_completion(request, parse_body(CompletionRequest, await read_json(request)))


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await create_chat_completion(request, parse_body(ChatCompletionRequest, await read_json(request)))


@router.post("/v1/embeddings")
async def embeddings(request: Request) -> Response:
    return await create_embeddings(request, parse_body(EmbeddingRequest, await read_json(request)))


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    name = request.app.state.served_model_name
    return {"object": "list", "data": [{"id": name, "object": "model", "created": _CREATED, "owned_by": "treadle",
                                        "root": name, "max_model_len": await _context_length(request.app.state)}]}


async def _context_length(state: Any) -> Any:
    """The engine's resolved context length (``server_args.context_length`` is None unless given):
    read once from ``get_server_info``, a control call, so off the event loop."""
    length = getattr(state, "openai_context_length", None)
    if length is None:
        length = state.engine.server_args.context_length
        if length is None:
            info = await run_in_threadpool(state.engine.get_server_info)
            length = info.get("context_length")
        state.openai_context_length = length
    return length
