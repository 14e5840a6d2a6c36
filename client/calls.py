"""The call plumbing between the ``Engine``'s public methods and its processes.

A ``generate``/``encode`` call registers its requests with the I/O thread (``supervisor.py``),
is sent to the tokenizer as one ``GenerateBatch``, and waits for its results: on a queue for a
sync caller, on the caller's own event loop for an async one (``call_soon_threadsafe`` from the
I/O thread), or chunk by chunk for a stream. A call that ends early (error, Ctrl-C, a stream
closed half-read) aborts what it left running.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from typing import Any, AsyncIterator, Callable, Iterator, Optional, Union

import msgspec
import zmq

from treadle.client.results import BatchResult, ReqState
from treadle.client.supervisor import Supervisor
from treadle.runtime.errors import EngineDeadError
from treadle.runtime.messages import AbortReq, GenerateBatch, GenerateReq
from treadle.runtime.server_args import ServerArgs
from treadle.runtime.zmq_utils import Sender


class TokenizerSocket:
    """The engine's one socket to the tokenizer. The callers' threads and the I/O thread (its DP
    reports) both send on it, and a ZeroMQ socket is not thread-safe: hence the lock."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self._sender = Sender(ctx, endpoint)
        self._lock = threading.Lock()
        self._closed = False

    def send(self, msg: Any) -> None:
        with self._lock:
            self._check_open()
            self._sender.send(msg)

    def send_bytes(self, payload: bytes) -> None:
        with self._lock:
            self._check_open()
            self._sender.send_bytes(payload)

    def _check_open(self) -> None:
        """A call that got past its liveness check just before ``shutdown()`` closed the socket."""
        if self._closed:
            raise EngineDeadError("The engine has been shut down.")

    def send_quietly(self, msg: Any) -> None:
        """Send unless the socket is already gone (shutting down): the I/O thread's DP bookkeeping
        (``ReqsDone``, ``GroupDown``) and the final ``Shutdown``."""
        try:
            self.send(msg)
        except zmq.ZMQError:
            pass

    def close(self) -> None:
        with self._lock:  # a send in progress finishes first; later ones raise EngineDeadError
            self._closed = True
            self._sender.close()


class Calls:
    """Runs the engine's calls: call ids, the liveness check every call starts with, and the
    submit / wait / abort cycle of ``generate`` and ``encode``."""

    def __init__(self, socket: TokenizerSocket, sup: Supervisor, server_args: ServerArgs) -> None:
        self.socket = socket
        self.sup = sup
        self.server_args = server_args
        self.closed = False  # set by shutdown: no new calls, no aborts
        self._ids = itertools.count(1)

    def next_id(self) -> int:
        return next(self._ids)

    def check_alive(self) -> None:
        a = self.server_args
        if a.node_rank > 0:
            raise RuntimeError(f"This engine is node_rank={a.node_rank} of nnodes={a.nnodes}: it only runs worker "
                               "ranks. Send requests to the node_rank=0 engine.")
        if self.closed:
            raise EngineDeadError("The engine has been shut down.")
        if self.sup.dead is not None:
            raise self.sup.dead

    def abort(self, rid: str, abort_all: bool = False) -> None:
        self.socket.send(AbortReq(rid=rid, abort_all=abort_all))

    # ------------------------------------------------------------------ whole results
    def run_sync(self, reqs: list[GenerateReq], is_batch: bool) -> Union[dict, BatchResult]:
        """Submit a call and block this thread until all its results are in."""
        q: queue.SimpleQueue = queue.SimpleQueue()
        call_id = self._submit(reqs, q.put, is_batch)
        results: list[Any] = [None] * len(reqs)
        try:
            for _ in range(len(reqs)):
                idx, item = q.get()
                if isinstance(item, BaseException):
                    raise item
                results[idx] = item
        finally:
            self._end_call(call_id)
        return BatchResult(results) if is_batch else results[0]

    async def run_async(self, reqs: list[GenerateReq], is_batch: bool) -> Union[dict, BatchResult]:
        """Submit a call and await all its results on the caller's event loop."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        call_id = self._submit(reqs, lambda item: loop.call_soon_threadsafe(q.put_nowait, item), is_batch)
        results: list[Any] = [None] * len(reqs)
        try:
            for _ in range(len(reqs)):
                idx, item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                results[idx] = item
        finally:
            self._end_call(call_id)
        return BatchResult(results) if is_batch else results[0]

    # ------------------------------------------------------------------ streams
    def stream_sync(self, reqs: list[GenerateReq], is_batch: bool) -> Iterator[dict]:
        """Submit now (so a bad call raises here), then yield chunks until every request finished."""
        q: queue.SimpleQueue = queue.SimpleQueue()
        call_id = self._submit(reqs, q.put, is_batch)

        def chunks() -> Iterator[dict]:
            pending = len(reqs)
            try:
                while pending:
                    _, item = q.get()
                    if isinstance(item, BaseException):
                        raise item
                    if item["meta_info"]["finish_reason"] is not None:
                        pending -= 1
                    yield item
            finally:
                self._end_call(call_id)

        return chunks()

    async def stream_async(self, reqs: list[GenerateReq], is_batch: bool) -> AsyncIterator[dict]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        call_id = self._submit(reqs, lambda item: loop.call_soon_threadsafe(q.put_nowait, item), is_batch)
        pending = len(reqs)
        try:
            while pending:
                _, item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                if item["meta_info"]["finish_reason"] is not None:
                    pending -= 1
                yield item
        finally:
            self._end_call(call_id)

    # ------------------------------------------------------------------ submit / end
    def _submit(self, reqs: list[GenerateReq], put: Callable[[Any], None], is_batch: bool) -> int:
        call_id = self.next_id()
        states = []
        for i, r in enumerate(reqs):
            want = (r.return_logprob, r.top_logprobs_num > 0, bool(r.token_ids_logprob), bool(r.return_hidden_states))
            st = ReqState(r.rid, r.created, lambda item, i=i: put((i, item)), index=i if is_batch else None, want=want,
                          with_text=not self.server_args.skip_tokenizer_init,
                          version_of=lambda: self.server_args.weight_version)
            states.append((st, r.stream))
        payload = checked_payload(GenerateBatch(call_id=call_id, reqs=reqs))
        self.sup.register(call_id, states)
        try:
            self.socket.send_bytes(payload)
        except BaseException:
            self.sup.unregister_call(call_id)
            raise
        return call_id

    def _end_call(self, call_id: int) -> None:
        """Abort whatever is still running of a call that ended early (error, Ctrl-C, closed stream)."""
        for rid in self.sup.unregister_call(call_id):
            if not self.closed and self.sup.dead is None:
                self.abort(rid)


_WIRE_CHECK = msgspec.msgpack.Decoder(GenerateBatch)


def checked_payload(batch: GenerateBatch) -> bytes:
    """Encode a call and check it decodes as the tokenizer will: a wrong type anywhere (say a str
    where a bool belongs), an int beyond 64 bits or text that is not valid Unicode is this call's
    ``ValueError`` naming the field, never an encoder's error or a frame the tokenizer must drop."""
    try:
        payload = msgspec.msgpack.encode(batch)
    except (OverflowError, UnicodeEncodeError, TypeError) as e:
        raise ValueError(f"Invalid request: {_unencodable(batch.reqs, 'reqs') or 'a value'} cannot be sent: {e}") \
            from None
    try:
        _WIRE_CHECK.decode(payload)
    except msgspec.ValidationError as e:
        raise ValueError(f"Invalid request: {e}".replace("$.reqs[0].", "").replace("$.reqs", "reqs")) from None
    return payload


def _unencodable(value: Any, path: str) -> Optional[str]:
    """The path of the first part of ``value`` msgpack cannot encode (None: it all encodes), so
    the error names ``sampling.top_k`` or ``input_ids[3]``, not just the whole call."""
    try:
        msgspec.msgpack.encode(value)
        return None
    except (OverflowError, UnicodeEncodeError, TypeError):
        pass
    if isinstance(value, msgspec.Struct):
        parts = [(f"{path}.{f}", getattr(value, f)) for f in value.__struct_fields__]
    elif isinstance(value, (list, tuple)):
        parts = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    elif isinstance(value, dict):
        parts = [(f"{path}[{k!r}]", v) for k, v in value.items()]
    else:
        return path
    for sub, v in parts:
        found = _unencodable(v, sub)
        if found is not None:
            return found.replace("reqs[0].", "") if path == "reqs" and len(value) == 1 else found
    return path
