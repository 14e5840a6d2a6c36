"""Finish rules after each new token, in SGLang's order (API.md section 4.2)."""

from __future__ import annotations

from typing import Any

from treadle.runtime.messages import FinishReason
from treadle.scheduler_proc.req import Req


def check_finish(req: Req, tokenizer: Any) -> None:
    """Set ``req.finish`` if the request is done: length, then stop strings, then stop tokens."""
    if req.finish is not None:
        return
    if len(req.output_ids) >= req.max_new_tokens:
        req.finish = FinishReason(type="length", length=req.max_new_tokens)
        return
    if req.stop_strs:
        window = max(len(s) for s in req.stop_strs) + 2
        tail = tokenizer.decode(req.output_ids[-window:], skip_special_tokens=False)
        for s in req.stop_strs:
            if s in tail:
                req.finish = FinishReason(type="stop", matched=s)
                return
    last = req.output_ids[-1]
    if last in req.stop_ids:
        req.finish = FinishReason(type="stop", matched=last)


def ends_with_stop_prefix(req: Req, tokenizer: Any) -> bool:
    """Whether the output so far ends with the start of a stop string: streaming holds such text
    back so a stop string is never partly shown (it is trimmed when it completes)."""
    if not req.stop_strs or not req.output_ids:
        return False
    tail = tokenizer.decode(req.output_ids[-(max(len(s) for s in req.stop_strs) + 2):], skip_special_tokens=False)
    return any(tail.endswith(s[:i]) for s in req.stop_strs for i in range(1, len(s)))
