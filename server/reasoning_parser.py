"""Separating a reasoning model's thinking (``<think>...</think>``) from its answer, whole or streamed.

OpenAI-compatible servers answer it as ``reasoning_content`` beside ``content`` (DeepSeek's API,
SGLang's ``--reasoning-parser``). Two formats, after SGLang's detectors:

- ``qwen3``: reasoning only inside an explicit ``<think>`` block at the start of the output
  (leading whitespace allowed). Qwen3's chat template puts ``<think>`` into the *prompt* when
  thinking is on, so the output starts inside the block: pass ``force_reasoning=True`` then
  (``opens_reasoning(prompt)`` tells; SGLang's serving layer sets it from ``enable_thinking``).
- ``deepseek-r1``: the output always starts inside the block (R1 emits no ``<think>``, R1-0528
  does; both are handled) and reasoning ends at ``</think>``.

The whole-text ``parse`` is the streamer fed everything at once, so the two can never disagree:
a streamer only decides on text it has seen in full, and holds back a partial tag (``"</thi"``)
or whitespace whose fate depends on what follows. The tags are dropped, reasoning is stripped at
both ends, and the whitespace right after ``</think>`` is dropped from the content. A ``<think>``
later in the content is content: models quote the tags.
"""

from __future__ import annotations

from typing import Optional

OPEN, CLOSE = "<think>", "</think>"

# name -> force_reasoning when the caller passes None
_DEFAULT_FORCE = {"qwen3": False, "deepseek-r1": True}
KNOWN = tuple(_DEFAULT_FORCE)

# streamer states
_START, _R_START, _REASONING, _C_START, _CONTENT = range(5)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag`` (a tag cut by a
    delta boundary)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningStreamer:
    """Splits a stream of text deltas into (reasoning delta, content delta) pairs."""

    def __init__(self, force_reasoning: bool) -> None:
        self.force = force_reasoning
        self.state = _START
        self.buf = ""  # text not decided yet
        self.pending_ws = ""  # reasoning whitespace kept until non-space reasoning follows it
        self.entered = False  # a reasoning block was seen (parse answers None otherwise)

    def feed(self, delta: str) -> tuple[str, str]:
        self.buf += delta
        return self._run(final=False)

    def finish(self) -> tuple[str, str]:
        """Flush what was held back: a partial tag is text after all; trailing reasoning
        whitespace is dropped (reasoning is stripped)."""
        out = self._run(final=True)
        self.pending_ws = ""
        return out

    def _run(self, final: bool) -> tuple[str, str]:
        reasoning: list[str] = []
        content: list[str] = []
        while self._step(reasoning, content, final):
            pass
        return "".join(reasoning), "".join(content)

    def _step(self, reasoning: list[str], content: list[str], final: bool) -> bool:
        """Advance once; False when more text is needed (or everything is consumed)."""
        if self.state == _START:
            head = self.buf.lstrip()
            if head.startswith(OPEN):
                self.buf, self.state, self.entered = head[len(OPEN):], _R_START, True
                return True
            if not final and (not head or OPEN.startswith(head)):
                return False  # whitespace or a cut "<thi": undecided
            if self.force:
                self.state, self.entered = _R_START, True
            else:
                self.state = _CONTENT
            return True
        if self.state in (_R_START, _C_START):
            self.buf = self.buf.lstrip()
            if not self.buf:
                return False
            self.state = _REASONING if self.state == _R_START else _CONTENT
            return True
        if self.state == _REASONING:
            end = self.buf.find(CLOSE)
            if end >= 0:
                self._reason(self.buf[:end], reasoning)
                self.pending_ws = ""
                self.buf, self.state = self.buf[end + len(CLOSE):], _C_START
                return True
            keep = 0 if final else _partial_suffix(self.buf, CLOSE)
            self._reason(self.buf[:len(self.buf) - keep], reasoning)
            self.buf = self.buf[len(self.buf) - keep:]
            return False
        if self.buf:  # _CONTENT
            content.append(self.buf)
            self.buf = ""
        return False

    def _reason(self, text: str, out: list[str]) -> None:
        """Emit reasoning text, holding its trailing whitespace until more reasoning follows."""
        body = text.rstrip()
        if body:
            out.append(self.pending_ws + body)
            self.pending_ws = text[len(body):]
        else:
            self.pending_ws += text


def opens_reasoning(prompt: str) -> bool:
    """Whether a rendered chat prompt ends inside a reasoning block (Qwen3-Thinking's template
    ends with ``<think>\\n``): the output then starts in it, so pass ``force_reasoning=True``."""
    return prompt.rstrip().endswith(OPEN)


class ReasoningParser:
    """One reasoning format by name; ``parse`` for a whole text, ``streamer()`` per streamed request."""

    def __init__(self, name: str, force_reasoning: Optional[bool] = None) -> None:
        if name not in _DEFAULT_FORCE:
            raise ValueError(f"reasoning_parser {name!r} is unknown; known parsers: {', '.join(KNOWN)}")
        self.name = name
        self.force_reasoning = _DEFAULT_FORCE[name] if force_reasoning is None else bool(force_reasoning)

    def streamer(self) -> ReasoningStreamer:
        return ReasoningStreamer(self.force_reasoning)

    def parse(self, text: str) -> tuple[Optional[str], str]:
        """(reasoning, content); reasoning is None when the text had no reasoning block."""
        s = self.streamer()
        r1, c1 = s.feed(text)
        r2, c2 = s.finish()
        return (r1 + r2 if s.entered else None), c1 + c2
