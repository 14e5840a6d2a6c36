"""Tool calls out of a model's text (OpenAI's ``tool_calls``), whole or streamed, and the sampling
constraint that makes the model call a tool when ``tool_choice`` demands it.

``ToolCallParser(name, tools)`` validates the request's ``tools`` (OpenAI's shape) once; a parse
never raises: what is not a well-formed call of a known function stays content. The formats live
in ``tool_formats.py``, the grammar for ``tool_choice`` in ``tool_grammar.py``.
"""

from __future__ import annotations

from typing import Any, Optional

from treadle.server.tool_formats import CallDelta, FormatStreamer, Llama3Streamer, Qwen25Streamer
from treadle.server.tool_grammar import tool_call_grammar

FORMATS: dict[str, type[FormatStreamer]] = {
    "llama3": Llama3Streamer,
    "qwen25": Qwen25Streamer,
    "qwen": Qwen25Streamer,
    "hermes": Qwen25Streamer,
}
KNOWN = tuple(FORMATS)


def validate_tools(tools: Any) -> dict[str, dict]:
    """name -> parameters schema of OpenAI-shaped ``tools``; ValueError naming the bad field."""
    if tools is None:
        return {}
    if not isinstance(tools, list):
        raise ValueError("tools must be a list of {'type': 'function', 'function': {...}} objects")
    out: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ValueError(f"{where} must be an object with type 'function'")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ValueError(f"{where}.function must be an object with a name")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}.function.name must be a non-empty string")
        if name in out:
            raise ValueError(f"{where}.function.name {name!r} is given twice")
        if not isinstance(fn.get("description", ""), (str, type(None))):
            raise ValueError(f"{where}.function.description must be a string")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"{where}.function.parameters must be a JSON schema object")
        out[name] = params or {}
    return out


def merge_call_deltas(deltas: list[CallDelta]) -> list[dict[str, str]]:
    """Streamed call deltas folded into whole calls ``{"name", "arguments"}``, by index."""
    calls: dict[int, dict[str, str]] = {}
    for d in deltas:
        call = calls.setdefault(d["index"], {"name": "", "arguments": ""})
        if "name" in d:
            call["name"] = d["name"]
        call["arguments"] += d.get("arguments_delta", "")
    return [calls[i] for i in sorted(calls)]


class ToolCallParser:
    """One tool-call format (by name) for one request's tools."""

    def __init__(self, name: str, tools: Any) -> None:
        if name not in FORMATS:
            raise ValueError(f"tool_call_parser {name!r} is unknown; known parsers: {', '.join(KNOWN)}")
        self.name = name
        self.format = FORMATS[name]
        self.functions = validate_tools(tools)

    def streamer(self) -> FormatStreamer:
        """A fresh streamer: ``feed(delta) -> (content delta, call deltas)``, then ``finish()``."""
        return self.format(set(self.functions))

    def parse(self, text: str) -> tuple[str, list[dict[str, str]]]:
        """(content, calls): calls ``{"name", "arguments"}`` with arguments a JSON string."""
        s = self.streamer()
        c1, d1 = s.feed(text)
        c2, d2 = s.finish()
        return c1 + c2, merge_call_deltas(d1 + d2)

    def constraint(self, tool_choice: Any) -> Optional[dict[str, str]]:
        """Sampling params forcing the calls ``tool_choice`` asks for: None for "auto"/"none";
        ``{"ebnf": ...}`` for "required" (one call or more) or a named function (exactly that call)."""
        if tool_choice is None or tool_choice in ("auto", "none"):
            return None
        if tool_choice == "required":
            if not self.functions:
                raise ValueError("tool_choice 'required' needs at least one function in tools")
            return {"ebnf": self._grammar(self.functions, at_least_one=True)}
        is_fn = isinstance(tool_choice, dict) and tool_choice.get("type", "function") == "function"
        fn = tool_choice.get("function") if is_fn else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise ValueError("tool_choice must be 'none', 'auto', 'required' or "
                             "{'type': 'function', 'function': {'name': ...}}")
        if name not in self.functions:
            raise ValueError(f"tool_choice names function {name!r}, which is not in tools")
        return {"ebnf": self._grammar({name: self.functions[name]}, at_least_one=False)}

    def _grammar(self, functions: dict[str, dict], at_least_one: bool) -> str:
        f = self.format
        if f is Qwen25Streamer:
            return tool_call_grammar(f.OPEN + "\n", "\n" + f.CLOSE, f.SEP, "arguments", functions, at_least_one)
        return tool_call_grammar("", "", Llama3Streamer.SEP, "parameters", functions, at_least_one)
