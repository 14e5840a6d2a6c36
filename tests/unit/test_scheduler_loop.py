"""The scheduler loop's intake while a step runs (``scheduler_proc/main.py``): new requests and
aborts are handled at once (an abort is answered without waiting for the step); the first other
input (a control call, shutdown) waits for the step's end, and so does everything after it."""

from __future__ import annotations

import collections
from types import SimpleNamespace
from typing import Any

from treadle.runtime.messages import AbortReq, FlushCache, TokenizedBatch, TokenizedReq, TokenOutBatch, WorkerInfo
from treadle.runtime.sampling_params import SamplingParams
from treadle.runtime.server_args import ServerArgs
from treadle.scheduler_proc.control import SchedulerControl
from treadle.scheduler_proc.main import SchedulerLoop
from treadle.scheduler_proc.scheduler import Scheduler


class FakeSocket:
    """A Receiver's and a Sender's methods over a list."""

    def __init__(self, inputs: list[Any] = ()) -> None:
        self.inputs = list(inputs)
        self.sent: list[Any] = []

    def recv_nowait(self) -> Any:
        return self.inputs.pop(0) if self.inputs else None

    def recv(self, timeout_ms: int) -> Any:
        return self.recv_nowait()

    def send(self, msg: Any) -> None:
        self.sent.append(msg)


def make_loop(inputs: list[Any]) -> SchedulerLoop:
    args = ServerArgs(device="cpu", random_seed=0, page_size=1, chunked_prefill_size=-1).resolved()
    tok = SimpleNamespace(decode=lambda ids, skip_special_tokens=False: "x" * len(ids))
    loop = SchedulerLoop.__new__(SchedulerLoop)  # no sockets, no worker: only the intake is tested
    loop.recv, loop.inbox, loop.to_detok = FakeSocket(inputs), FakeSocket(), FakeSocket()
    loop.deferred = collections.deque()
    loop.running = True
    loop.sched = Scheduler(args, tok, {0}, WorkerInfo(context_len=256, kv_tokens=512, max_slots=4, vocab_size=100))
    loop.control = SchedulerControl(loop.sched, lambda call: None, loop.to_detok)
    return loop


def req(rid: str) -> TokenizedBatch:
    return TokenizedBatch(reqs=[TokenizedReq(rid=rid, input_ids=[1, 2, 3], sampling=SamplingParams(max_new_tokens=4))])


def test_requests_and_aborts_are_taken_during_a_step_and_other_inputs_wait_in_order():
    loop = make_loop([req("a"), req("b")])
    assert loop.take_inputs_in_step() and loop.sched.schedule() is not None  # a step in flight runs both
    loop.recv.inputs = [AbortReq(rid="a"), FlushCache(call_id=7), AbortReq(rid="b")]
    assert not loop.take_inputs_in_step()  # stopped at the control call
    (batch,) = loop.to_detok.sent  # "a"'s abort was answered at once
    assert isinstance(batch, TokenOutBatch) and [o.rid for o in batch.outs] == ["a"]
    assert batch.outs[0].finish.type == "abort"
    assert list(loop.deferred) == [FlushCache(call_id=7)] and loop.recv.inputs == [AbortReq(rid="b")]
    assert not loop.take_inputs_in_step()  # nothing more is read while the call waits
    assert loop.recv.inputs == [AbortReq(rid="b")] and not loop.inbox.sent
    loop.drain_inputs(block=True)  # the step ended: the call first, then the abort behind it
    (reply,) = loop.inbox.sent
    assert reply.call_id == 7 and reply.ok and reply.result == {"success": False}  # not idle: no flush
    assert not loop.deferred and not loop.recv.inputs
    loop.flush_outputs()
    assert [o.rid for o in loop.to_detok.sent[-1].outs] == ["b"]


def test_intake_during_a_step_reads_until_the_socket_is_empty():
    loop = make_loop([req("a"), AbortReq(rid="nobody")])
    assert loop.take_inputs_in_step()
    assert [r.rid for r in loop.sched.waiting] == ["a"] and not loop.deferred and not loop.recv.inputs
