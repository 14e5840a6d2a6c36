"""Result shapes: per-request state in the client, result dicts, and the batch result type."""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from treadle.runtime.messages import StrOut


class BatchResult(list):
    """A list of result dicts that also answers column access (API.md part A).

    ``res[0]["text"]`` and ``res["text"][0]`` both work; ``res["embedding"]`` lists the vectors.
    """

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        if isinstance(key, str):
            return [item[key] for item in self]
        if isinstance(key, slice):
            return BatchResult(super().__getitem__(key))
        return super().__getitem__(key)


class ReqState:
    """Accumulates one request's outputs; ``deliver`` hands items to whoever waits on it."""

    def __init__(self, rid: str, created: float, deliver: Callable[[Any], None], index: Optional[int] = None) -> None:
        self.rid = rid
        self.created = created
        self.deliver = deliver
        self.index = index
        self.text = ""
        self.output_ids: list[int] = []
        self.finished = False

    def update(self, out: StrOut, incremental: bool, stream: bool) -> Optional[dict[str, Any]]:
        """Fold one output in; return the chunk to deliver (every update when streaming, else the last)."""
        self.text += out.text
        self.output_ids.extend(out.new_ids)
        self.finished = out.finish is not None
        if not stream and not self.finished:
            return None
        meta: dict[str, Any] = {
            "id": self.rid,
            "finish_reason": out.finish.to_json() if out.finish is not None else None,
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
            "cached_tokens": out.cached_tokens,
        }
        if self.finished:
            meta["e2e_latency"] = time.time() - self.created
        if stream and incremental:
            chunk: dict[str, Any] = {"text": out.text, "output_ids": list(out.new_ids), "meta_info": meta}
        else:
            chunk = {"text": self.text, "output_ids": list(self.output_ids), "meta_info": meta}
        if self.index is not None and stream:
            chunk["index"] = self.index
        return chunk
