"""OpenAI's request fields -> the engine's sampling parameters, and the engine's results -> the
parts of OpenAI's responses that completions and chat share (ids, finish reasons, usage).

One place maps them so that both endpoints agree: ``max_tokens`` is ``max_new_tokens``, ``seed``
is ``sampling_seed``, ``response_format`` becomes the engine's ``json_schema`` (compiled by
xgrammar in the engine), SGLang's extras pass through under their engine names.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Optional

from treadle.server.errors import APIError, body_of

# the schema OpenAI's "json_object" mode promises: some JSON object
JSON_OBJECT_SCHEMA = {"type": "object"}
MAX_TOP_LOGPROBS = 20


def check_model(state: Any, model: Optional[str]) -> None:
    """The request must name the served model (OpenAI's clients always send one); none is accepted
    as SGLang accepts it."""
    if model is not None and model != state.served_model_name:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{state.served_model_name}'.",
                       "model", "model_not_found")


def check_serving(state: Any) -> None:
    """New work is refused once the engine died or the server drains (SIGTERM)."""
    if state.engine_dead is not None:
        raise APIError(503, f"The engine is not running: {state.engine_dead}", code="engine_dead")
    if state.draining:
        raise APIError(503, "The server is shutting down.", code="draining")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def sampling_params(req: Any, max_tokens: Optional[int], max_tokens_field: str = "max_tokens") -> dict[str, Any]:
    """The engine's ``sampling_params`` for a completions or chat request (fields left at OpenAI's
    defaults are left out, so the engine's defaults apply)."""
    if max_tokens is not None and max_tokens < 0:
        raise APIError(400, f"{max_tokens_field} must be at least 0, got {max_tokens}.", max_tokens_field)
    if req.n < 1:
        raise APIError(400, f"n must be at least 1, got {req.n}.", "n")
    p: dict[str, Any] = {"max_new_tokens": max_tokens, "n": req.n}
    if req.temperature is not None:
        p["temperature"] = req.temperature
    if req.top_p is not None:
        p["top_p"] = req.top_p
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name):
            p[name] = getattr(req, name)
    for name in ("top_k", "min_p", "repetition_penalty", "regex", "ebnf", "json_schema", "stop", "stop_token_ids",
                 "logit_bias"):
        if getattr(req, name) is not None:
            p[name] = getattr(req, name)
    for name, default in (("ignore_eos", False), ("skip_special_tokens", True), ("no_stop_trim", False)):
        if getattr(req, name) != default:
            p[name] = getattr(req, name)
    if req.min_tokens:
        p["min_new_tokens"] = req.min_tokens
    if req.seed is not None:
        p["sampling_seed"] = req.seed
    schema = response_format_schema(req.response_format)
    if schema is not None:
        p["json_schema"] = schema
    return p


def response_format_schema(fmt: Any) -> Optional[str]:
    """``{"type": "json_object"}`` -> a generic object schema; ``json_schema`` -> its schema, checked
    against its JSON Schema metaschema here so that a broken schema is a 400 naming the field."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return json.dumps(JSON_OBJECT_SCHEMA)
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise APIError(400, "response_format.json_schema.schema is required for type 'json_schema'.",
                       "response_format")
    schema = fmt.json_schema.schema_
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise APIError(400, f"response_format: the JSON schema is invalid: {e.message}", "response_format") from None
    return json.dumps(schema)


def finish_reason(meta: dict[str, Any], tool_calls: bool = False) -> Optional[str]:
    """The engine's ``{"type": "stop"|"length"|"abort", ...}`` -> OpenAI's string."""
    reason = meta.get("finish_reason")
    if reason is None:
        return None
    kind = reason.get("type") if isinstance(reason, dict) else str(reason)
    if tool_calls and kind == "stop":
        return "tool_calls"
    return kind


def matched_stop(meta: dict[str, Any]) -> Any:
    reason = meta.get("finish_reason")
    return reason.get("matched") if isinstance(reason, dict) else None


def usage(metas: list[dict[str, Any]], n: int) -> dict[str, int]:
    """With ``n`` samples per prompt the prompt is counted once (OpenAI's and SGLang's usage)."""
    prompt = sum(int(m.get("prompt_tokens", 0) or 0) for m in metas[::max(n, 1)])
    completion = sum(int(m.get("completion_tokens", 0) or 0) for m in metas)
    cached = sum(int(m.get("cached_tokens", 0) or 0) for m in metas[::max(n, 1)])
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": prompt + completion}
    if cached:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


# the engine's names for fields OpenAI's clients send under another name
OPENAI_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "sampling_seed": "seed",
                "top_logprobs_num": "logprobs"}


def as_openai_error(exc: Exception) -> APIError:
    """The engine's ValueError/TypeError (which names its own field first) as a 400 naming the
    field the client sent: ``max_new_tokens`` is the client's ``max_tokens``."""
    body = body_of(exc)["error"]
    param = body["param"]
    message = body["message"]
    if param in OPENAI_NAMES:
        message = message.replace(param, OPENAI_NAMES[param], 1)
        param = OPENAI_NAMES[param]
    return APIError(400, message, param)


def check_top_logprobs(value: Optional[int], field: str) -> None:
    if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"{field} must be in [0, {MAX_TOP_LOGPROBS}], got {value}.", field)


