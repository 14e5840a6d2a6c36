"""A chat completion's generated text -> OpenAI's ``message`` / stream ``delta``: ``<think>``
blocks into ``reasoning_content`` (server arg ``reasoning_parser``), tool-call text into
``tool_calls`` (server arg ``tool_call_parser``). No engine here, so it is tested on fake text.
"""

from __future__ import annotations

import uuid
from typing import Any, Optional


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ChatParsers:
    """The parsers one request uses: ``reasoning`` when the server has a reasoning parser and the
    request keeps ``separate_reasoning``; ``tools`` when it has a tool-call parser and the request
    offers tools that ``tool_choice`` does not switch off."""

    def __init__(self, reasoning: Any = None, tools: Any = None) -> None:
        self.reasoning, self.tools = reasoning, tools

    @classmethod
    def for_request(cls, server_args: Any, req: Any, tools: Optional[list[dict[str, Any]]],
                    prompt_tail: str = "") -> "ChatParsers":
        """``prompt_tail``: the end of the rendered prompt; a template that opened ``<think>`` there
        (Qwen3 with thinking on) makes the output start inside the reasoning block."""
        reasoning = tool_parser = None
        name = getattr(server_args, "reasoning_parser", None)
        if name and req.separate_reasoning:
            from treadle.server.reasoning_parser import ReasoningParser, opens_reasoning

            reasoning = ReasoningParser(name, True if opens_reasoning(prompt_tail) else None)
        name = getattr(server_args, "tool_call_parser", None)
        if name and tools and req.tool_choice != "none":
            from treadle.server.tool_parsers import ToolCallParser

            tool_parser = ToolCallParser(name, tools)
        return cls(reasoning, tool_parser)

    def message(self, text: str) -> tuple[dict[str, Any], bool]:
        """The whole output as ``message``; True when it holds tool calls."""
        reasoning, content = (None, text) if self.reasoning is None else self.reasoning.parse(text)
        calls: list[dict[str, Any]] = []
        if self.tools is not None:
            content, calls = self.tools.parse(content)
        msg: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
        if reasoning is not None:
            msg["reasoning_content"] = reasoning
        if calls:
            msg["tool_calls"] = [{"id": call_id(), "type": "function",
                                  "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]
        return msg, bool(calls)

    def streamer(self) -> "ChatDeltaStreamer":
        return ChatDeltaStreamer(self)


class ChatDeltaStreamer:
    """One choice's stream: text deltas in, OpenAI ``delta`` objects out (None when a delta only
    fed a parser's buffer, a partial ``<think>`` or tool-call tag)."""

    def __init__(self, parsers: ChatParsers) -> None:
        self.reasoning = parsers.reasoning.streamer() if parsers.reasoning is not None else None
        self.tools = parsers.tools.streamer() if parsers.tools is not None else None
        self.ids: dict[int, str] = {}  # tool-call index -> its id, sent with its first delta

    @property
    def has_calls(self) -> bool:
        return bool(self.ids)

    def feed(self, text: str) -> Optional[dict[str, Any]]:
        r, c = self.reasoning.feed(text) if self.reasoning is not None else ("", text)
        calls: list[dict[str, Any]] = []
        if self.tools is not None and c:
            c, calls = self.tools.feed(c)
        return self._delta(r, c, calls)

    def finish(self) -> Optional[dict[str, Any]]:
        r, c = self.reasoning.finish() if self.reasoning is not None else ("", "")
        calls: list[dict[str, Any]] = []
        if self.tools is not None:
            if c:
                c, calls = self.tools.feed(c)
            c2, calls2 = self.tools.finish()
            c, calls = (c or "") + (c2 or ""), calls + list(calls2 or [])
        return self._delta(r, c, calls)

    def _delta(self, reasoning: Optional[str], content: Optional[str], calls: list[dict[str, Any]]) -> Optional[dict]:
        delta: dict[str, Any] = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if content:
            delta["content"] = content
        if calls:
            delta["tool_calls"] = [self._call_delta(d) for d in calls]
        return delta or None

    def _call_delta(self, d: dict[str, Any]) -> dict[str, Any]:
        index = int(d.get("index", 0))
        out: dict[str, Any] = {"index": index}
        fn: dict[str, Any] = {}
        if index not in self.ids:
            self.ids[index] = call_id()
            out.update(id=self.ids[index], type="function")
        if d.get("name") is not None:
            fn["name"] = d["name"]
        if d.get("arguments_delta") is not None:
            fn["arguments"] = d["arguments_delta"]
        out["function"] = fn
        return out
