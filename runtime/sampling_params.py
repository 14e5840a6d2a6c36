"""Sampling parameters: SGLang's field names, defaults and ranges (API.md section 4.1).

``SamplingParams(**user_dict)`` raises ``TypeError`` for an unknown key (msgspec's keyword
check); ``verify()`` raises ``ValueError`` naming the field for a bad type or value.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import msgspec

TOP_K_ALL = -1
MAX_N = 1024
INT64 = 1 << 63  # every int on the wire fits a signed 64-bit word (msgpack cannot carry more)


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    max_new_tokens: Optional[int] = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = TOP_K_ALL
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = None
    stop_regex: Union[str, list[str], None] = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    json_schema: Optional[str] = None
    regex: Optional[str] = None
    ebnf: Optional[str] = None
    structural_tag: Optional[str] = None
    custom_params: Optional[dict[str, Any]] = None
    stream_interval: Optional[int] = None
    logit_bias: Optional[dict[str, float]] = None
    sampling_seed: Optional[int] = None

    def stop_strs(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def is_greedy(self) -> bool:
        return self.temperature < 1e-6 or self.top_k == 1

    def verify(self, vocab_size: Optional[int] = None) -> None:
        """Check types and ranges; ``vocab_size`` enables the token-id checks."""
        _check_int("max_new_tokens", self.max_new_tokens, lo=0, optional=True)
        _check_int("min_new_tokens", self.min_new_tokens, lo=0)
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                f"got {self.min_new_tokens}."
            )
        _check_float("temperature", self.temperature, lo=0.0)
        _check_float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        _check_int("top_k", self.top_k)
        if self.top_k < 1 and self.top_k != -1:
            raise ValueError(f"top_k must be -1 (disable) or at least 1, got {self.top_k}.")
        _check_float("min_p", self.min_p, lo=0.0, hi=1.0)
        _check_float("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0)
        _check_float("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0)
        _check_float("repetition_penalty", self.repetition_penalty)
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}.")
        _check_int("n", self.n, lo=1, hi=MAX_N)
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}.")
        if self.stop is not None and not isinstance(self.stop, (str, list, tuple)):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}.")
        for s in self.stop_strs():
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}.")
            check_text("stop", s)
        grammars = [k for k in ("json_schema", "regex", "ebnf") if getattr(self, k) is not None]
        if len(grammars) > 1:
            raise ValueError("Only one of regex, json_schema, or ebnf can be set.")
        for k in grammars:
            if not isinstance(getattr(self, k), str):
                raise ValueError(f"{k} must be a string.")
            check_text(k, getattr(self, k))
        _check_int("stream_interval", self.stream_interval, lo=1, optional=True)
        _check_int("sampling_seed", self.sampling_seed, optional=True)
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple, set)):
                raise ValueError(f"stop_token_ids must be a list of ints, got {self.stop_token_ids!r}.")
            for t in self.stop_token_ids:  # ids beyond the vocabulary are allowed: they never match (as in SGLang)
                _check_int("stop_token_ids", t, lo=0)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError("logit_bias must be a dict of token id to bias.")
            for k, v in self.logit_bias.items():
                try:
                    tid = int(k)
                except (TypeError, ValueError):
                    raise ValueError(f"logit_bias keys must be token ids, got {k!r}.") from None
                if tid < 0 or (vocab_size is not None and tid >= vocab_size):
                    limit = f"token ids in [0, {vocab_size})" if vocab_size is not None else "non-negative token ids"
                    raise ValueError(f"logit_bias keys must be {limit}, got {k!r}.")
                _check_float("logit_bias", v)
        if self.custom_params is not None:
            if not isinstance(self.custom_params, dict):
                raise ValueError(f"custom_params must be a dict, got {type(self.custom_params).__name__}.")
            try:
                msgspec.msgpack.encode(self.custom_params)
            except (TypeError, OverflowError, UnicodeEncodeError, ValueError) as e:
                raise ValueError(f"custom_params must hold only dicts, lists, strings, numbers, bools and None "
                                 f"(it travels to the worker process): {e}") from None


def _check_int(name: str, v: Any, lo: Optional[int] = None, hi: Optional[int] = None, optional: bool = False) -> None:
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an int, got {v!r}.")
    if not -INT64 <= v < INT64:
        raise ValueError(f"{name} must fit in a signed 64-bit integer, got {v}.")
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be at least {lo}, got {v}.")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be at most {hi}, got {v}.")


def _check_float(name: str, v: Any, lo: Optional[float] = None, hi: Optional[float] = None) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name} must be a number, got {v!r}.")
    if isinstance(v, int) and not -INT64 <= v < INT64:
        raise ValueError(f"{name} is out of range, got {v}.")
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}.")
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be at least {lo}, got {v}.")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be at most {hi}, got {v}.")


def check_text(name: str, text: str) -> None:
    """A string that must cross a process boundary as UTF-8: a lone surrogate (say, half of an
    emoji cut by a slice) cannot, so it is this field's ``ValueError``, not an encoder's error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid Unicode text: {e.reason} at position {e.start}.") from None
