"""What the router reads from a request body to place it: the text its prefix tree matches on,
and the session it belongs to. The router never tokenizes: the text (or the token ids written
out) is only a key whose prefixes are shared where the prompts' prefixes are."""

from __future__ import annotations

from typing import Any, Optional

# the body field holding each routed route's input
_INPUT_FIELD = {"/generate": ("text", "prompt", "input_ids"), "/encode": ("text", "prompt", "input_ids"),
                "/v1/completions": ("prompt",), "/v1/embeddings": ("input",), "/v1/rerank": ("query",),
                "/v1/score": ("query",)}
MAX_KEY_CHARS = 20_000  # a longer prompt is matched on its start (the part a prefix cache shares)


def routing_text(path: str, body: Any) -> str:
    """The request's text for prefix matching ("" when it has none: routed by load)."""
    if not isinstance(body, dict):
        return ""
    if path == "/v1/chat/completions":
        return _chat_text(body.get("messages"))[:MAX_KEY_CHARS]
    for key in _INPUT_FIELD.get(path, ()):
        if body.get(key) is not None:
            return _as_text(body[key])[:MAX_KEY_CHARS]
    return ""


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        if all(isinstance(v, int) for v in value):  # token ids
            return " ".join(map(str, value))
        return _as_text(value[0])  # a batch: placed by its first item
    return ""


def _chat_text(messages: Any) -> str:
    if not isinstance(messages, list):
        return ""
    parts = []
    for m in messages:
        if not isinstance(m, dict):
            continue
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's content parts: the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"<{m.get('role')}>{content or ''}")
    return "".join(parts)


def session_of(body: Any, header: Optional[str] = None) -> Optional[str]:
    """The session a request continues: ``session_params.id`` (SGLang's; ``session_id`` too), or
    the ``X-Session-ID`` header for any route."""
    if isinstance(body, dict) and isinstance(body.get("session_params"), dict):
        params = body["session_params"]
        sid = params.get("id", params.get("session_id"))
        if isinstance(sid, str) and sid:
            return sid
    return header or None
