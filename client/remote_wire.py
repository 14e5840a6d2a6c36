"""The wire side of ``RemoteEngine``: an HTTP error into the exception the in-process ``Engine``
would raise, server-sent events into chunk dicts, and the JSON results back into the in-process
result shapes (the request bodies are ``remote_args.py``'s).

Kept apart from ``remote.py`` so that each piece can be tested without a server (the unit tests
feed these functions by hand and through ``httpx.MockTransport``).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Union

import msgspec

from treadle.client.results import BatchResult
from treadle.runtime.errors import EngineDeadError, EngineOverloadedError

_decoder = msgspec.json.Decoder()

# meta_info keys holding SGLang's ``(logprob, token_id, text)`` tuples, which JSON turns into lists
_LOGPROB_KEYS = ("input_token_logprobs", "output_token_logprobs", "input_top_logprobs", "output_top_logprobs",
                 "input_token_ids_logprobs", "output_token_ids_logprobs")


class InvalidRequestError(ValueError, TypeError):
    """The server's 400: the in-process engine raised ``ValueError`` (a bad value) or ``TypeError``
    (an unknown key, a wrong type), and HTTP carries both as one status, so this is both: code
    written against the in-process ``Engine`` catches it either way. The message is the server's,
    which names the field."""


# ---------------------------------------------------------------------------------------- errors
def error_of(status: int, content: bytes, url: str, api_key_set: bool = False) -> BaseException:
    """The exception for an HTTP error answer (OpenAI's ``{"error": {...}}`` shape, or anything else)."""
    err = _error_object(content)
    message = err.get("message") or content.decode("utf-8", "replace").strip() or f"HTTP {status}"
    return exception_for(status, err.get("code"), message, url, api_key_set)


def exception_for(status: int, code: Any, message: str, url: str, api_key_set: bool = False) -> BaseException:
    """One mapping, for an error answer and for an error event inside a stream (whose ``code`` is
    the status, or a word such as ``overloaded``)."""
    if code == "overloaded" or (status == 503 and code in (None, 503) and _sounds_overloaded(message)):
        return EngineOverloadedError(message)
    if status in (400, 413, 422):
        return InvalidRequestError(message)
    if status in (401, 403):
        hint = "the api_key given to RemoteEngine was refused" if api_key_set else \
            "the server requires an API key: RemoteEngine(url, api_key=...)"
        return PermissionError(f"{url}: {message} ({hint}).")
    if status == 404:
        return NotImplementedError(f"{url}: {message} (this server has no such route).")
    if status == 501:
        return NotImplementedError(message)
    if status == 504:
        return TimeoutError(message)
    if status == 500:  # the engine raised something the server has no status for: it is alive
        return RuntimeError(message.split(": ", 1)[1] if message.startswith("RuntimeError: ") else message)
    if status >= 500:
        return EngineDeadError(f"The engine behind {url} is not serving (HTTP {status}): {message}")
    return RuntimeError(f"{url} answered HTTP {status}: {message}")


def _sounds_overloaded(message: str) -> bool:
    low = message.lower()
    return "overload" in low or "queue is full" in low


def _error_object(content: bytes) -> dict[str, Any]:
    try:
        body = _decoder.decode(content) if content else None
    except msgspec.DecodeError:
        return {}
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return err
    if isinstance(err, str):
        return {"message": err}
    return {}


def connection_error(url: str, exc: BaseException) -> EngineDeadError:
    return EngineDeadError(f"Cannot reach the Treadle server at {url}: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------- results
def decode_json(content: bytes) -> Any:
    return _decoder.decode(content)


def result_of(obj: Any) -> Union[dict, BatchResult, Any]:
    """A JSON answer in the in-process shapes: a list is a ``BatchResult``, and logprob entries are
    tuples again."""
    if isinstance(obj, list):
        return BatchResult(result_of(item) for item in obj)
    if isinstance(obj, dict):
        meta = obj.get("meta_info")
        if isinstance(meta, dict):
            for key in _LOGPROB_KEYS:
                if isinstance(meta.get(key), list):
                    meta[key] = [_tuples(entry) for entry in meta[key]]
    return obj


def _tuples(entry: Any) -> Any:
    """``[lp, id, text]`` -> ``(lp, id, text)``; a list of those -> a list of tuples; None stays."""
    if not isinstance(entry, list) or not entry:
        return entry
    if isinstance(entry[0], list):
        return [tuple(e) for e in entry]
    return tuple(entry)


def sse_chunks(lines: Iterable[str], url: str) -> Iterator[dict[str, Any]]:
    """The chunks of an SSE stream's ``data:`` lines, up to ``[DONE]``; an error event raises its
    exception. A stream that ends without ``[DONE]`` lost its server: ``EngineDeadError``."""
    for line in lines:
        chunk = sse_line(line, url)
        if chunk is _DONE:
            return
        if chunk is not None:
            yield chunk
    raise EngineDeadError(f"The stream from {url} ended before it finished (the server went away).")


_DONE = object()


def sse_line(line: str, url: str) -> Any:
    """One SSE line: a chunk dict, ``_DONE``, or None (blank lines, comments, other fields)."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if payload == "[DONE]":
        return _DONE
    if not payload:
        return None
    chunk = _decoder.decode(payload)
    if isinstance(chunk, dict) and isinstance(chunk.get("error"), dict) and "meta_info" not in chunk:
        err = chunk["error"]
        code = err.get("code")
        status = code if isinstance(code, int) else (503 if code in ("overloaded", "engine_dead") else 500)
        raise exception_for(status, code, err.get("message") or "error in the stream", url)
    return result_of(chunk)

