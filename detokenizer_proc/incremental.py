"""Per-request incremental detokenization (the surrounding-window scheme SGLang's detokenizer uses).

Decoding one token at a time is wrong for two reasons: byte-level BPE splits a multi-byte character
across tokens (each piece alone decodes to U+FFFD), and many decoders make a token's text depend on
its neighbours (leading-space handling, special-token spacing). So each step decodes a short window
``ids[surr:]`` and subtracts the decode of ``ids[surr:read]``: the difference is the text the tokens
after ``read`` add *in context*. Text is committed (and the window slides) only once it no longer ends
in an incomplete character; everything returned is a delta past ``sent_offset``, so the concatenation
of deltas is exactly the final text and nothing once returned is ever revised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

REPLACEMENT_CHAR = "\ufffd"  # what a lossy UTF-8 decode leaves for a character cut between tokens


@dataclass
class DecodeState:
    """One request's detokenization progress.

    ``ids`` holds the context ids followed by every output id; ``n_context`` marks where output starts.
    ``decoded_text`` is committed output text (final, never rewritten); ``sent_offset`` counts the
    characters of output text already returned to the caller.
    """

    ids: list[int]
    n_context: int
    surr_offset: int
    read_offset: int
    decoded_text: str = ""
    sent_offset: int = 0


class IncrementalDetokenizer:
    """Turns streams of output token ids into streams of text deltas, one state per request id."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, DecodeState] = {}
        # Some tokenizers (older slow ones, custom wrappers) reject this kwarg; learn that once.
        self._spaces_kwarg_ok = True

    def _decode(self, ids: Sequence[int], skip: bool, spaces: bool) -> str:
        if not ids:
            return ""
        if self._spaces_kwarg_ok:
            try:
                return self.tokenizer.decode(list(ids), skip_special_tokens=skip,
                                             spaces_between_special_tokens=spaces)
            except TypeError:
                self._spaces_kwarg_ok = False
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip)

    def _suffix(self, st: DecodeState, a: int, b: int, c: int, skip: bool, spaces: bool) -> str:
        """Text that ids[b:c] add after ids[a:b], decoded together so neighbours shape it."""
        return self._decode(st.ids[a:c], skip, spaces)[len(self._decode(st.ids[a:b], skip, spaces)):]

    def _new_state(self, context_ids: Sequence[int], skip: bool, spaces: bool) -> DecodeState:
        ctx = list(context_ids)
        # Context that itself ends mid-character would misalign the subtraction; use none then.
        if ctx and self._decode(ctx, skip, spaces).endswith(REPLACEMENT_CHAR):
            ctx = []
        # surr starts at the context's beginning, read at its end: the context is decoded alongside
        # the first output tokens (so e.g. their leading space survives) but never emitted itself.
        return DecodeState(ids=ctx, n_context=len(ctx), surr_offset=0, read_offset=len(ctx))

    def add(self, rid: str, new_ids: Sequence[int], *, context_ids: Sequence[int] = (),
            finished: bool = False, skip_special_tokens: bool = True,
            spaces_between_special_tokens: bool = True, trim_stop_str: str | None = None,
            trim_last_token: bool = False) -> str:
        """Feed a request's new output ids; return the NEW text (delta) to show now.

        ``context_ids`` (e.g. the prompt's last few tokens) is read only on a request's first call.
        ``trim_last_token`` (finish only) drops the final output id's text: a matched stop/EOS token.
        ``trim_stop_str`` cuts the output at the stop string's first occurrence; pass it on every
        call, not only the last, so text that may turn out to start the stop string is held back
        rather than streamed and then unsendable.
        """
        skip, spaces = skip_special_tokens, spaces_between_special_tokens
        st = self.states.get(rid)
        if st is None:
            st = self.states[rid] = self._new_state(context_ids, skip, spaces)
        st.ids.extend(new_ids)
        if finished:
            text = self._final_text(st, trim_last_token, skip, spaces)
            if trim_stop_str and (i := text.find(trim_stop_str)) >= 0:
                text = text[:i]
            del self.states[rid]
        else:
            new = self._suffix(st, st.surr_offset, st.read_offset, len(st.ids), skip, spaces)
            if new and not new.endswith(REPLACEMENT_CHAR):
                st.decoded_text += new
                st.surr_offset, st.read_offset = st.read_offset, len(st.ids)
                new = ""
            text = st.decoded_text + new.rstrip(REPLACEMENT_CHAR)
            if trim_stop_str:
                text = _hold_back_stop(text, trim_stop_str)
        delta = text[st.sent_offset:]
        st.sent_offset = max(st.sent_offset, len(text))
        return delta

    def _final_text(self, st: DecodeState, trim_last: bool, skip: bool, spaces: bool) -> str:
        """Full output text at finish, every pending id flushed (U+FFFD and all)."""
        end = len(st.ids) - (1 if trim_last and len(st.ids) > st.n_context else 0)
        if end < st.read_offset:
            # The trimmed id came in an earlier call and was committed, so its text is already out
            # and cannot be recalled; callers send the stop id with the finishing call.
            return st.decoded_text
        return st.decoded_text + self._suffix(st, st.surr_offset, st.read_offset, end, skip, spaces)

    def drop(self, rid: str) -> None:
        """Forget a request (aborted, or finished by the caller); unknown ids are fine."""
        self.states.pop(rid, None)


def _hold_back_stop(text: str, stop: str) -> str:
    """Cut at the stop string, or withhold a tail that could still grow into it."""
    if (i := text.find(stop)) >= 0:
        return text[:i]
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return text[:-k]
    return text
