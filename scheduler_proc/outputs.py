"""What the scheduler sends back: token outputs for the detokenizer (when to stream, finished
embeddings), errors for the client, and the release of finished requests, with the request log.

A request is answered as soon as it finishes, but its slot and KV are given back only once no
step in flight uses them (``release_finished``).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import msgspec
import numpy as np

from treadle.runtime.messages import FinishReason, RowOut, TokenOut
from treadle.runtime.server_args import ServerArgs
from treadle.scheduler_proc.memory import KvBudget
from treadle.scheduler_proc.req import Req
from treadle.scheduler_proc.sessions import Sessions
from treadle.scheduler_proc.stop_checker import ends_with_stop_prefix

logger = logging.getLogger("treadle.scheduler")
LOG_IDS_EDGE = 32  # log_requests_level 2 shows this many ids at each end
PROGRESS_LOG_S = 5.0  # seconds between two decode progress lines


class Outputs:
    """Collects ``TokenOut``s and errors until the loop takes them; releases finished requests
    from ``running`` (the scheduler's list, changed in place)."""

    def __init__(self, args: ServerArgs, tokenizer: Any, kv: KvBudget, sessions: Sessions, running: list[Req],
                 normalize_embeddings: bool) -> None:
        self.args = args
        self.tokenizer = tokenizer
        self.kv = kv
        self.sessions = sessions
        self.running = running
        self.normalize_embeddings = normalize_embeddings
        self.pooled_normalized = normalize_embeddings  # the worker's pooling normalizes (an encoder's, there)
        self.token_outs: list[TokenOut] = []
        self.errors: list[tuple[str, str, str]] = []  # (rid, kind, message) of requests failed after intake
        self.num_generated = 0  # tokens since the last progress line
        self.last_log = time.monotonic()

    # ------------------------------------------------------------------ answering
    def emit(self, req: Req) -> None:
        self.token_outs.append(req.token_out(self.args.enable_metrics))
        if req.finish_sent and req.tokenized.session is not None:
            # The client may send the next turn as soon as it has this one, before this turn's
            # release (a step in flight delays it): the table knows the turn's output from now.
            self.sessions.table.finish(req.tokenized.session.id, req.rid, req.output_ids)

    def fail(self, rid: str, kind: str, message: str) -> None:
        """The client gets an error for ``rid`` instead of a result."""
        self.errors.append((rid, kind, message))

    def should_stream(self, req: Req) -> bool:
        """An unfinished request's new tokens go out now (``stream_interval``, never part of a stop string)."""
        if not req.tokenized.stream:
            return False
        k = req.sampling.stream_interval or self.args.stream_interval
        n = len(req.output_ids)
        due = req.sent < n if k == 1 else (n - req.sent) >= k or req.sent == 0
        return due and not ends_with_stop_prefix(req, self.tokenizer)

    def finish_embedding(self, req: Req, extra: Optional[RowOut]) -> None:
        if extra is None or not extra.hidden:
            raise RuntimeError(f"the worker returned no embedding for {req.rid}")
        vec = np.frombuffer(extra.hidden, dtype=np.float32)
        cut = req.tokenized.dimensions
        if cut is not None:  # Matryoshka: the first values, normalized after the cut when the pooling normalizes
            vec = vec[:cut]
        if self.normalize_embeddings or (cut is not None and self.pooled_normalized):
            vec = vec / max(float(np.linalg.norm(vec)), 1e-12)
        req.embedding = vec.astype(np.float32).tobytes()
        req.finish = FinishReason(type="length", length=0)
        self.emit(req)

    def finish_unrun(self, req: Req, reason: FinishReason) -> None:
        """Finish a request that holds no KV (aborted or displaced in the queue, nothing to
        generate): answer it, and end its session turn as a running one's release does."""
        req.finish = reason
        self.emit(req)
        self.sessions.turn_done(req)

    def release_finished(self) -> None:
        """Give back the slot and KV of every finished request no step in flight uses, answering
        it if that has not happened yet; then its session keeps the turn's KV (``turn_done``)."""
        keep = []
        for req in self.running:
            if req.finish is None or req.steps_in_flight:  # a step in flight still uses its slot and KV
                keep.append(req)
                continue
            if not req.finish_sent:
                self.emit(req)
            if self.args.log_requests:
                self.log_request("finish", req, req.output_ids)
            self.kv.free(req)
            self.sessions.turn_done(req)
        self.running[:] = keep

    def take(self) -> list[TokenOut]:
        out, self.token_outs = self.token_outs, []
        return out

    def take_errors(self) -> list[tuple[str, str, str]]:
        out, self.errors = self.errors, []
        return out

    # ------------------------------------------------------------------ logging
    def log_request(self, event: str, req: Req, ids: list[int]) -> None:
        """``log_requests``: the request's sizes (level 0), its sampling parameters (1), the head and
        tail of its prompt or output ids (2), all of them (3), as SGLang's ``log_requests_level``."""
        level = self.args.log_requests_level
        parts = [f"{event} rid={req.rid}"]
        if event == "receive":
            parts.append(f"prompt_tokens={len(ids)} max_new_tokens={req.max_new_tokens}")
        else:
            parts.append(f"completion_tokens={len(ids)} reason={req.finish.to_json()}")
        if level >= 1 and event == "receive":
            parts.append(f"sampling={msgspec.json.encode(req.tokenized.sampling).decode()}")
        if level >= 2:
            shown = ids if level >= 3 or len(ids) <= 2 * LOG_IDS_EDGE else \
                [*ids[:LOG_IDS_EDGE], "...", *ids[-LOG_IDS_EDGE:]]
            parts.append(f"{'input' if event == 'receive' else 'output'}_ids={shown}")
        logger.info(" ".join(parts))

    def log_progress(self, new_tokens: int, num_waiting: int) -> None:
        """Count a step's sampled tokens; every few seconds while requests run, log the throughput."""
        self.num_generated += new_tokens
        now = time.monotonic()
        if now - self.last_log >= PROGRESS_LOG_S and self.running:
            tput = self.num_generated / (now - self.last_log)
            logger.info("decode: #running-req %d, #waiting %d, gen throughput %.1f tok/s",
                        len(self.running), num_waiting, tput)
            self.num_generated, self.last_log = 0, now
