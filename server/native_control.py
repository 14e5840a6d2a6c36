"""SGLang's native control routes: server and model info, ``/health_generate``, the cache, aborts,
profiling, LoRA adapters, sessions and ``/metrics``.

The engine's control calls are synchronous (they wait on the scheduler's answer), so they run in
the thread pool and never block the event loop that streams other requests' tokens. Bodies are
checked here against the fields each call takes: an unknown field or a wrong type is a 400 naming
it, before anything reaches the engine.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Callable, Optional

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from treadle.server.errors import APIError, error_response
from treadle.server.http_utils import json_response, read_json
from treadle.server.metrics import CONTENT_TYPE_LATEST

router = APIRouter()
HEALTH_GENERATE_TIMEOUT_S = 20.0  # one token; longer means the engine is stuck, not busy

# JSON type names for the messages, and what each accepts (bool is not an int here)
_TYPES: dict[str, tuple[type, ...]] = {"string": (str,), "boolean": (bool,), "integer": (int,),
                                       "number": (int, float), "object": (dict,)}


def fields(body: dict[str, Any], spec: dict[str, str], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """``body`` checked against ``spec`` (field -> JSON type; null allowed unless required): a 400
    naming the first unknown, missing or mistyped field."""
    for name in body:
        if name not in spec:
            raise APIError(400, f"Unknown field '{name}' (this route takes: {', '.join(spec) or 'no fields'}).", name)
    for name in required:
        if body.get(name) is None:
            raise APIError(400, f"'{name}' is required.", name)
    for name, value in body.items():
        kind = spec[name]
        if value is None and name not in required:
            continue
        if not isinstance(value, _TYPES[kind]) or (kind in ("integer", "number") and isinstance(value, bool)):
            raise APIError(400, f"'{name}' must be a {kind}, not {type(value).__name__}.", name)
    return body


def check_serving(state: Any) -> None:
    """New work is refused once the engine died or the server drains (SIGTERM)."""
    if state.engine_dead is not None:
        raise APIError(503, f"The engine is not running: {state.engine_dead}", code="engine_dead")
    if state.draining:
        raise APIError(503, "The server is shutting down.", code="draining")


# the engine's words for an argument it does not take: a whole call's, or a sampling parameter's
_UNKNOWN = (re.compile(r"got unexpected keyword argument\(s\): (.+)$"),
            re.compile(r"[Uu]nexpected keyword argument '([^']+)'"))


def unknown_field(exc: BaseException) -> Optional[APIError]:
    """A 400 naming the field, for the engine's error about an argument it does not take."""
    for pattern in _UNKNOWN:
        m = pattern.search(str(exc))
        if m is not None:
            names = [n.strip() for n in m.group(1).split(",")]
            return APIError(400, f"Unknown field(s): {', '.join(names)}.", names[0])
    return None


async def _control(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await run_in_threadpool(call, *args, **kwargs)


@router.get("/health_generate")
async def health_generate(request: Request) -> Response:
    """Run one token through the whole engine: 200 if it comes back, 503 otherwise."""
    state = request.app.state
    check_serving(state)
    try:
        out = await asyncio.wait_for(state.engine.async_generate(
            input_ids=[0], sampling_params={"max_new_tokens": 1, "temperature": 0.0}), HEALTH_GENERATE_TIMEOUT_S)
    except asyncio.TimeoutError:
        return error_response(503, f"No token within {HEALTH_GENERATE_TIMEOUT_S:.0f} s.", code="unhealthy")
    finish = (out.get("meta_info") or {}).get("finish_reason") or {}
    if isinstance(finish, dict) and finish.get("type") == "abort":
        return error_response(503, f"The health check was aborted: {finish.get('message')}", code="unhealthy")
    return Response(status_code=200)


@router.get("/get_server_info")
async def get_server_info(request: Request) -> Response:
    return json_response(await _control(request.app.state.engine.get_server_info))


@router.get("/get_model_info")
async def get_model_info(request: Request) -> Response:
    state = request.app.state  # the engine's facts, with the name this server answers to
    return json_response({**state.engine.get_model_info(), "served_model_name": state.served_model_name})


@router.api_route("/flush_cache", methods=["GET", "POST"])
async def flush_cache(request: Request) -> Response:
    out = await _control(request.app.state.engine.flush_cache)
    return json_response({"success": bool(out.success), "message": out.message or ""}, 200 if out.success else 400)


@router.api_route("/freeze_gc", methods=["GET", "POST"])
async def freeze_gc(request: Request) -> Response:
    """``gc.freeze()`` in the engine's processes and the server's (SGLang's route; call after warm-up)."""
    await _control(request.app.state.engine.freeze_gc)
    return json_response({})


@router.post("/abort_request")
async def abort_request(request: Request) -> Response:
    body = fields(await read_json(request), {"rid": "string", "abort_all": "boolean"})
    request.app.state.engine.abort_request(body.get("rid"), bool(body.get("abort_all")))
    return json_response({})


@router.post("/start_profile")
async def start_profile(request: Request) -> Response:
    """The body is ``Engine.start_profile``'s keyword arguments; an unknown one is the engine's
    ``TypeError``, a 400."""
    body = await read_json(request)
    try:
        await _control(request.app.state.engine.start_profile, **body)
    except TypeError as e:
        raise (unknown_field(e) or e) from None
    return json_response({})


@router.post("/stop_profile")
async def stop_profile(request: Request) -> Response:
    await _control(request.app.state.engine.stop_profile)
    return json_response({})


def _lora_answer(out: Any) -> Response:
    return json_response({"success": bool(out.success), "error_message": out.error_message,
                          "loaded_adapters": out.loaded_adapters}, 200 if out.success else 400)


@router.post("/load_lora_adapter")
async def load_lora_adapter(request: Request) -> Response:
    body = fields(await read_json(request), {"lora_name": "string", "lora_path": "string", "pinned": "boolean"},
                  required=("lora_name", "lora_path"))
    engine = request.app.state.engine
    return _lora_answer(await engine.async_load_lora_adapter(body["lora_name"], body["lora_path"],
                                                             bool(body.get("pinned"))))


@router.post("/unload_lora_adapter")
async def unload_lora_adapter(request: Request) -> Response:
    body = fields(await read_json(request), {"lora_name": "string"}, required=("lora_name",))
    return _lora_answer(await request.app.state.engine.async_unload_lora_adapter(body["lora_name"]))


@router.post("/update_weights_from_disk")
async def update_weights_from_disk(request: Request) -> Response:
    """SGLang's route: ``{"success", "message", "num_paused_requests"}``, 200 if the weights changed,
    else 400 (the old weights still serve)."""
    body = fields(await read_json(request), {"model_path": "string", "load_format": "string",
                                             "weight_version": "string"}, required=("model_path",))
    check_serving(request.app.state)
    ok, message, paused = await request.app.state.engine.async_update_weights_from_disk(
        body["model_path"], body.get("load_format"), body.get("weight_version"))
    return json_response({"success": ok, "message": message, "num_paused_requests": paused}, 200 if ok else 400)


@router.post("/open_session")
async def open_session(request: Request) -> Response:
    """The new session's id as a JSON string; 400 if ``session_id`` names one already open."""
    body = fields(await read_json(request), {"capacity_of_str_len": "integer", "session_id": "string",
                                             "streaming": "boolean", "timeout": "number"},
                  required=("capacity_of_str_len",))
    check_serving(request.app.state)
    sid: Optional[str] = await _control(request.app.state.engine.open_session, body["capacity_of_str_len"],
                                        body.get("session_id"), bool(body.get("streaming")), body.get("timeout"))
    if sid is None:
        raise APIError(400, f"Session {body.get('session_id')!r} is already open.", "session_id")
    return json_response(sid)


@router.post("/close_session")
async def close_session(request: Request) -> Response:
    body = fields(await read_json(request), {"session_id": "string"}, required=("session_id",))
    await _control(request.app.state.engine.close_session, body["session_id"])
    return json_response({})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text; the engine gauges are read now, unless the engine is gone (then the
    request-level series alone, so a scrape still shows what happened before)."""
    state = request.app.state
    info = None
    if state.engine_dead is None:
        try:
            info = await _control(state.engine.get_server_info)
        except Exception:  # noqa: BLE001 - a scrape must not fail because the engine just died
            info = None
    return Response(state.metrics.render(info), media_type=CONTENT_TYPE_LATEST)
