"""SGLang's scoring routes: ``POST /v1/rerank`` (a cross-encoder's score of each document for a
query) and ``POST /v1/score`` (``Engine.score``: label-token probabilities after query + item).

``/v1/rerank`` answers SGLang's list of ``{"score", "document", "index", "meta_info"}``, best
first (``top_n`` keeps that many; ``return_documents: false`` leaves the texts out).
``/v1/score`` answers ``{"scores", "model", "usage", "object": "scoring"}``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from treadle.server.errors import APIError
from treadle.server.http_utils import json_response, read_json, timed_engine_call
from treadle.server.openai_sampling import check_model, check_serving

router = APIRouter()

_RERANK_FIELDS = {"query", "documents", "top_n", "return_documents", "model"}
_SCORE_FIELDS = {"query", "items", "label_token_ids", "apply_softmax", "item_first", "model"}


def _check_fields(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise APIError(400, f"Unknown field(s): {', '.join(unknown)}.", unknown[0])


@router.post("/v1/rerank")
async def rerank(request: Request) -> Response:
    state, body = request.app.state, await read_json(request)
    _check_fields(body, _RERANK_FIELDS)
    check_model(state, body.get("model"))
    query, docs = body.get("query"), body.get("documents")
    if not isinstance(query, str):
        raise APIError(400, "query is required (a string).", "query")
    if not isinstance(docs, list) or not docs or not all(isinstance(d, str) for d in docs):
        raise APIError(400, "documents is required (a non-empty list of strings).", "documents")
    top_n = body.get("top_n")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise APIError(400, f"top_n must be a positive integer, got {top_n!r}.", "top_n")
    check_serving(state)
    timer = state.metrics.timer()
    out = await timed_engine_call(request, timer, state.engine.async_rerank([[query, d] for d in docs]))
    if out is None:  # the client went away: its request was aborted
        return Response(status_code=499)
    timer.done("success", sum(int(r["meta_info"].get("prompt_tokens", 0)) for r in out))
    ranked = [{"score": r["embedding"], "index": i, "meta_info": r["meta_info"],
               **({"document": docs[i]} if body.get("return_documents", True) else {})} for i, r in enumerate(out)]
    ranked.sort(key=lambda x: x["score"] if isinstance(x["score"], float) else x["score"][0], reverse=True)
    return json_response(ranked[:top_n] if top_n else ranked)


@router.post("/v1/score")
async def score(request: Request) -> Response:
    state, body = request.app.state, await read_json(request)
    _check_fields(body, _SCORE_FIELDS)
    check_model(state, body.get("model"))
    check_serving(state)
    timer = state.metrics.timer()
    kwargs = {k: body[k] for k in _SCORE_FIELDS - {"model"} if k in body}
    out = await timed_engine_call(request, timer, state.engine.async_score(**kwargs))
    if out is None:
        return Response(status_code=499)
    timer.done("success", out.prompt_tokens)
    usage = {"prompt_tokens": out.prompt_tokens, "completion_tokens": 0, "total_tokens": out.prompt_tokens}
    return json_response({"scores": out.scores, "model": state.served_model_name, "usage": usage,
                          "object": "scoring"})
