"""The tool-call text formats, as streamers: text deltas in, (content delta, call deltas) out.

One streamer per request. A call is emitted only once its text is complete and parses as a call
to a known function (its name delta and its whole arguments in the same ``feed``), and anything
that looked like a call but is not one (an unknown function, broken JSON, a block cut off by
``max_tokens``) goes out as content. That is the price of one rule: the whole-text ``parse`` is
the streamer fed at once, and both give the same result for every way the text is cut into
deltas. Whitespace between content and a call is dropped, as SGLang's detectors strip it.

Formats (after SGLang's ``qwen25_detector`` / ``llama32_detector`` and vLLM's hermes/llama parsers):

- Qwen 2.5 / Hermes: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks
  anywhere in the text; text outside the blocks is content.
- Llama 3.x JSON: ``{"name": ..., "parameters": {...}}`` at the start of the output, or after
  ``<|python_tag|>``; several separated by ``;``.
"""

from __future__ import annotations

import json
from typing import Any, Optional

CallDelta = dict[str, Any]  # {"index", "name"} or {"index", "arguments_delta"}


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def json_object_end(text: str) -> Optional[int]:
    """The index just past the ``}`` closing the object that ``text`` starts with (``text[0]`` is
    ``{``), or None while it is incomplete. Brackets inside strings do not count."""
    depth, in_str, esc = 0, False, False
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def call_of(text: str, names: set[str], arg_keys: tuple[str, ...]) -> Optional[tuple[str, str]]:
    """(name, arguments as a JSON string) when ``text`` is one JSON call of a known function."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in names:
        return None
    args: Any = next((obj[k] for k in arg_keys if k in obj), {})
    if isinstance(args, str):  # some models send the arguments already encoded
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


class FormatStreamer:
    """Content and call emission shared by the formats; subclasses implement ``_step``."""

    ARG_KEYS: tuple[str, ...] = ("arguments",)

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.buf = ""  # text not decided yet
        self.pending_ws = ""  # content whitespace dropped if a call follows it
        self.skip_ws = False  # just after a call: drop leading content whitespace
        self.index = 0  # calls emitted so far
        self._content: list[str] = []
        self._calls: list[CallDelta] = []

    def feed(self, delta: str) -> tuple[str, list[CallDelta]]:
        self.buf += delta
        return self._run(final=False)

    def finish(self) -> tuple[str, list[CallDelta]]:
        """Decide what was held back: an unfinished call is content; trailing content whitespace stays."""
        content, calls = self._run(final=True)
        content += self.pending_ws
        self.pending_ws = ""
        return content, calls

    def _run(self, final: bool) -> tuple[str, list[CallDelta]]:
        while self._step(final):
            pass
        content, calls = "".join(self._content), self._calls
        self._content, self._calls = [], []
        return content, calls

    def _step(self, final: bool) -> bool:
        """Advance once; False when more text is needed (or everything is consumed)."""
        raise NotImplementedError

    def emit_content(self, text: str) -> None:
        if self.skip_ws:
            text = text.lstrip()
            if not text:
                return
            self.skip_ws = False
        body = text.rstrip()
        if body:
            self._content.append(self.pending_ws + body)
            self.pending_ws = text[len(body):]
        else:
            self.pending_ws += text

    def emit_region(self, text: str, raw: str) -> None:
        """``text`` is a call's JSON if it parses as one; otherwise ``raw`` (its whole text) is content."""
        call = call_of(text, self.names, self.ARG_KEYS)
        if call is None:
            self.emit_content(raw)
            return
        self.pending_ws, self.skip_ws = "", True
        self._calls += [{"index": self.index, "name": call[0]}, {"index": self.index, "arguments_delta": call[1]}]
        self.index += 1

    def emit_until(self, tag: str, final: bool) -> bool:
        """Emit content up to ``tag``; True (tag consumed) when found, else holds a cut tag back."""
        i = self.buf.find(tag)
        if i >= 0:
            self.emit_content(self.buf[:i])
            self.buf = self.buf[i + len(tag):]
            return True
        keep = 0 if final else partial_suffix(self.buf, tag)
        self.emit_content(self.buf[:len(self.buf) - keep])
        self.buf = self.buf[len(self.buf) - keep:]
        return False


class Qwen25Streamer(FormatStreamer):
    OPEN, CLOSE, SEP = "<tool_call>", "</tool_call>", "\n"
    ARG_KEYS = ("arguments", "parameters")

    def __init__(self, names: set[str]) -> None:
        super().__init__(names)
        self.in_block = False

    def _step(self, final: bool) -> bool:
        if not self.in_block:
            self.in_block = self.emit_until(self.OPEN, final)
            return self.in_block
        end = self.buf.find(self.CLOSE)
        if end >= 0:
            inner = self.buf[:end]
            self.emit_region(inner.strip(), self.OPEN + inner + self.CLOSE)
            self.buf, self.in_block = self.buf[end + len(self.CLOSE):], False
            return True
        if final:  # cut off before </tool_call>: a complete JSON call still counts
            self.emit_region(self.buf.strip(), self.OPEN + self.buf)
            self.buf = ""
        return False


class Llama3Streamer(FormatStreamer):
    TAG, SEP = "<|python_tag|>", "; "
    ARG_KEYS = ("parameters", "arguments")
    _START, _CONTENT, _CALLS = range(3)

    def __init__(self, names: set[str]) -> None:
        super().__init__(names)
        self.state = self._START

    def _step(self, final: bool) -> bool:
        if self.state == self._START:
            head = self.buf.lstrip()
            if head.startswith(self.TAG):
                self.buf, self.state = head[len(self.TAG):], self._CALLS
            elif head.startswith("{"):
                self.buf, self.state = head, self._CALLS
            elif not final and (not head or self.TAG.startswith(head)):
                return False
            else:
                self.state = self._CONTENT
            return True
        if self.state == self._CONTENT:
            if self.emit_until(self.TAG, final):
                self.state = self._CALLS
                return True
            return False
        # _CALLS: JSON objects separated by ";" (separators and whitespace between them dropped)
        self.buf = self.buf.lstrip(" \t\r\n;")
        if not self.buf:
            return False
        if not self.buf.startswith("{"):
            self.state = self._CONTENT
            return True
        end = json_object_end(self.buf)
        if end is None:
            if final:
                self.emit_content(self.buf)
                self.buf = ""
            return False
        self.emit_region(self.buf[:end], self.buf[:end])
        self.buf = self.buf[end:]
        return True
