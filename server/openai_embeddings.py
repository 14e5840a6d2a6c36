"""``POST /v1/embeddings`` over ``Engine.async_encode``: the inputs as one batch, the vectors
as floats or (``encoding_format: "base64"``) little-endian float32 bytes, as OpenAI's client
decodes them."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from fastapi import Request, Response

from treadle.server.errors import APIError
from treadle.server.http_utils import json_response, timed_engine_call
from treadle.server.openai_protocol import EmbeddingRequest
from treadle.server.openai_sampling import check_model, check_serving


def _batch(inp: Any) -> list[Any]:
    if isinstance(inp, str):
        return [inp]
    if not inp:
        raise APIError(400, "input must not be empty.", "input")
    if isinstance(inp[0], int):
        return [list(inp)]
    return list(inp)


async def create_embeddings(request: Request, req: EmbeddingRequest) -> Response:
    state = request.app.state
    check_model(state, req.model)
    batch = _batch(req.input)
    check_serving(state)
    timer = state.metrics.timer()
    out = await timed_engine_call(request, timer, state.engine.async_encode(prompt=batch, dimensions=req.dimensions))
    if out is None:  # the client went away: its request was aborted
        return Response(status_code=499)
    results = list(out) if isinstance(out, list) else [out]
    prompt_tokens = sum(int((r.get("meta_info") or {}).get("prompt_tokens", 0) or 0) for r in results)
    timer.done("success", prompt_tokens)
    data = [{"object": "embedding", "index": i, "embedding": _encode(r["embedding"], req.encoding_format)}
            for i, r in enumerate(results)]
    return json_response({"object": "list", "data": data, "model": state.served_model_name,
                          "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}})


def _encode(vector: Any, fmt: str) -> Any:
    if fmt == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]
