"""The scheduler process: its sockets and event loop around ``Scheduler``."""

from __future__ import annotations

import collections
import logging
import time
from typing import Any, Optional

import msgspec
import zmq

from treadle.runtime.hf_config import eos_token_ids, load_config
from treadle.runtime.tokenizer import load_tokenizer_of
from treadle.runtime.messages import (
    SCHEDULER_IN, AbortReq, Call, ChildReady, GetWorkerInfo, Reply, ReqError, Shutdown, StepResult, SyncStep,
    TokenizedBatch, TokenOutBatch, WorkerInfo, UpdateWeightsFromDisk, UpdateWeightsFromTensor,
    UpdateWeightsFromDistributed, ReleaseMemoryOccupation, ResumeMemoryOccupation, FinishWeightUpdate,
)
from treadle.runtime.procs import ChildSpec
from treadle.runtime.zmq_utils import Receiver, Sender
from treadle.scheduler_proc.control import SchedulerControl, WorkerCallError
from treadle.scheduler_proc.scheduler import Scheduler
from treadle.scheduler_proc.weight_update import WeightUpdate

logger = logging.getLogger("treadle.scheduler")
IDLE_POLL_MS = 1000
WEIGHT_UPDATES = (UpdateWeightsFromDisk, UpdateWeightsFromTensor, UpdateWeightsFromDistributed)
# calls that run only once no request runs: new requests wait, running ones finish first
DRAINING_CALLS = (*WEIGHT_UPDATES, ReleaseMemoryOccupation)
GRAMMAR_POLL_S = 0.01


class SchedulerLoop:
    def __init__(self, spec: ChildSpec, ctx: zmq.Context, inbox: Sender) -> None:
        self.spec = spec
        self.args = spec.args
        self.inbox = inbox
        self.recv = Receiver(ctx, spec.endpoints["scheduler"], SCHEDULER_IN, bind=True)
        self.results = Receiver(ctx, spec.endpoints["scheduler_results"], SCHEDULER_IN, bind=True)
        # tcp:// worker endpoints (ranks on several machines) are bound here; remote workers connect.
        self.to_workers = [Sender(ctx, ep, bind=ep.startswith("tcp://")) for ep in spec.extra["worker_endpoints"]]
        self.to_detok = Sender(ctx, spec.endpoints["detokenizer"])
        self.early_results: dict[int, StepResult] = {}
        self.sent_at: dict[int, float] = {}  # step -> when its plan left (for the step-time stats)
        self.last_result_at = 0.0
        self.deferred: collections.deque[Any] = collections.deque()  # inputs that wait for the step's end
        self.drained_call: Optional[Call] = None  # a DRAINING_CALLS call: waits for the running requests to end
        tokenizer = load_tokenizer_of(spec.files, self.args)  # None with skip_tokenizer_init (no stop strings then)
        self.worker_info = msgspec.convert(self.worker_call(GetWorkerInfo()), WorkerInfo)
        hidden_size = int(load_config(spec.files.model_dir).get("hidden_size", 0))
        self.sched = Scheduler(self.args, tokenizer, eos_token_ids(spec.files.model_dir, tokenizer), self.worker_info,
                               hidden_size, tokenizer_dir=spec.files.tokenizer_dir)
        self.control = SchedulerControl(self.sched, self.worker_call, self.to_detok)
        self.weights = WeightUpdate(self.sched, self.worker_call)
        self.running = True

    def worker_call(self, call: Call) -> Any:
        """A blocking control call (start-up info, profiling, LoRA adapters) sent to every rank and
        answered by the reporting one (TP rank 0 of the last stage)."""
        for w in self.to_workers:
            w.send(call)
        while True:
            msg = self.results.recv()
            if isinstance(msg, StepResult):  # a step in flight finished first: keep it for wait_step
                self.early_results[msg.step] = msg
            elif isinstance(msg, Reply):
                if not msg.ok:
                    raise WorkerCallError(msg.error)
                return msg.result

    def serve(self) -> None:
        info = {**self.sched.internal_state(), "worker": msgspec.structs.asdict(self.worker_info)}
        self.inbox.send(ChildReady(name=self.spec.name, info=info))
        # Overlap scheduling keeps two steps in flight: step N+1 is planned and sent before the
        # result of step N is applied (its decode inputs are placeholders the worker fills).
        # Pipeline parallelism keeps pp_size micro-batches in flight, one per stage.
        depth = self.sched.max_plans_in_flight
        while self.running:
            self.drain_inputs(block=self.sched.is_idle() and not self.sched.plans_in_flight)
            self.flush_outputs()  # answers to aborts and refusals go now, not after the next step
            if self.drained_call is not None and not self.sched.running and not self.sched.plans_in_flight:
                self.run_drained_call()
            plan = self.sched.schedule() if len(self.sched.plans_in_flight) < depth else None
            if plan is not None:
                for w in self.to_workers:
                    w.send(plan)
                self.sent_at[plan.step] = time.monotonic()
            if self.sched.plans_in_flight and (plan is None or len(self.sched.plans_in_flight) >= depth):
                if plan is None:  # nothing to queue behind the last step: ask for its result now
                    for w in self.to_workers:
                        w.send(SyncStep())
                oldest = self.sched.plans_in_flight[0].step
                result = self.wait_step(oldest)
                self.time_step(oldest)
                self.sched.apply_result(result.next_token_ids, result.extras, step=oldest)
            elif plan is None and not self.sched.is_idle():
                self.sched.grammars.wait(GRAMMAR_POLL_S)  # only compiling requests wait: sleep, don't spin
            self.flush_outputs()
            self.sched.sessions.expire()
            self.control.drop_unused_adapters()
            if self.sched.is_idle():
                self.sched.check_integrity()
        self.sched.grammars.shutdown()
        for w in self.to_workers:
            w.send(Shutdown())
        self.to_detok.send(Shutdown())

    def wait_step(self, step: int) -> StepResult:
        """The result of ``step``. Meanwhile aborts and new requests are taken in as they come (an
        abort is answered now, not when the step ends: the step may be long, a CPU prefill chunk
        takes seconds); any other input ends that until the step is over (``take_inputs_in_step``).
        Watchdog: a step that takes more than ``watchdog_timeout`` s means a worker is stuck (a
        hung collective, a processor that never returns); the scheduler then fails, which the
        client reports as the engine's death, instead of every call hanging."""
        if step in self.early_results:
            return self.early_results.pop(step)
        deadline = time.monotonic() + self.args.watchdog_timeout
        poller = zmq.Poller()
        poller.register(self.results.sock, zmq.POLLIN)
        if not self.deferred:  # else the kept input's followers stay queued: nothing to watch
            poller.register(self.recv.sock, zmq.POLLIN)
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            ready = dict(poller.poll(max(1, left_ms))) if left_ms > 0 else {}
            if not ready:
                raise RuntimeError(f"step {step} ran for more than watchdog_timeout={self.args.watchdog_timeout:g} s: "
                                   "a worker is stuck; the engine stops")
            if self.recv.sock in ready and not self.take_inputs_in_step():
                poller.unregister(self.recv.sock)
            msg = self.results.recv_nowait() if self.results.sock in ready else None
            if isinstance(msg, StepResult) and msg.step == step:
                return msg
            if isinstance(msg, StepResult):
                raise RuntimeError(f"the worker answered step {msg.step} while step {step} was expected")

    def take_inputs_in_step(self) -> bool:
        """Handle the queued inputs that are safe while a step runs: new requests and aborts (answered
        at once). The first other one (a control call, shutdown) is kept for ``drain_inputs`` and
        stops this, so inputs keep their order; returns False then (and while one is kept)."""
        while not self.deferred:
            try:
                msg = self.recv.recv_nowait()
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                logger.error("dropped a malformed message: %s", e)
                continue
            if msg is None:
                return True
            if not isinstance(msg, (TokenizedBatch, AbortReq)):
                self.deferred.append(msg)
                return False
            self.handle(msg)
            self.flush_outputs()
        return False

    def time_step(self, step: int) -> None:
        """How long the worker spent on ``step``: from its plan leaving (or the previous result, if
        the worker was still busy then) to its result; internal_state reports the last and longest."""
        now = time.monotonic()
        took_ms = int(1000 * (now - max(self.sent_at.pop(step), self.last_result_at)))
        self.last_result_at = now
        stats = self.sched.stats
        stats["last_step_ms"], stats["longest_step_ms"] = took_ms, max(stats["longest_step_ms"], took_ms)
        logger.debug("step %d took %d ms", step, took_ms)

    def drain_inputs(self, block: bool) -> None:
        first = not self.deferred  # an input kept during the step comes first (and there is work: no block)
        while self.deferred:
            self.handle(self.deferred.popleft())
        while True:
            try:
                msg = self.recv.recv(IDLE_POLL_MS) if (block and first) else self.recv.recv_nowait()
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                logger.error("dropped a malformed message: %s", e)
                continue
            first = False
            if msg is None:
                return
            self.handle(msg)

    def handle(self, msg: Any) -> None:
        if isinstance(msg, TokenizedBatch):
            for rid, kind, message in self.sched.add_requests(msg.reqs):
                self.inbox.send(ReqError(kind=kind, message=message, rids=[rid]))
        elif isinstance(msg, AbortReq):
            self.sched.abort(msg.rid, msg.abort_all)
        elif isinstance(msg, DRAINING_CALLS):
            refusal = self.refusal(msg)
            if refusal:
                self.inbox.send(Reply(call_id=msg.call_id, ok=True, result={"success": False, "message": refusal}))
            else:  # answered once the running requests end (run_drained_call); new ones wait meanwhile
                self.drained_call, self.sched.admission_paused = msg, True
        elif isinstance(msg, ResumeMemoryOccupation):
            self.inbox.send(self.resume_memory(msg))
        elif isinstance(msg, FinishWeightUpdate):
            self.inbox.send(Reply(call_id=msg.call_id, ok=True, result=self.finish_update(msg)))
        elif isinstance(msg, Call):
            self.inbox.send(self.control.answer(msg))
        elif isinstance(msg, Shutdown):
            self.running = False

    def refusal(self, call: Call) -> str:
        """Why a draining call cannot run now ("" if it can)."""
        if self.drained_call is not None or self.weights.held is not None:
            return "Another weight update or memory release is in progress."
        if isinstance(call, WEIGHT_UPDATES) and call.phase not in ("both", "check"):
            return f"A weight update's phase must be 'both' or 'check', got {call.phase!r}."
        if isinstance(call, WEIGHT_UPDATES) and "weights" in self.sched.released:
            return "The weights are released (release_memory_occupation): resume_memory_occupation first."
        return ""

    def run_drained_call(self) -> None:
        """A weight update or memory release, now that no request runs (as SGLang's default: new
        requests waited, running ones finished on the old weights)."""
        call, self.drained_call = self.drained_call, None
        result = self.release_memory(call) if isinstance(call, ReleaseMemoryOccupation) else self.weights.run(call)
        self.sched.admission_paused = self.paused()
        self.inbox.send(Reply(call_id=call.call_id, ok=True, result=result))

    def paused(self) -> bool:
        """New requests wait while memory is released, a draining call waits, or a checked update is held."""
        return bool(self.sched.released) or self.drained_call is not None or self.weights.held is not None

    def finish_update(self, call: FinishWeightUpdate) -> dict[str, Any]:
        """The client's next step of a checked update (scheduler_proc/weight_update.py). An ``end``
        that comes while this group's check still waits for its running requests (the client gave
        up: its caller was interrupted) cancels that check, so the group never holds it."""
        pending = self.drained_call
        if call.action == "end" and isinstance(pending, WEIGHT_UPDATES) and pending.phase == "check":
            self.drained_call = None
            self.inbox.send(Reply(call_id=pending.call_id, ok=True, result={
                "success": False, "message": "The weight update was cancelled before it ran."}))
        result = self.weights.finish(call)
        self.sched.admission_paused = self.paused()
        return result

    def release_memory(self, call: ReleaseMemoryOccupation) -> dict[str, Any]:
        """The workers free the tagged memory; a released KV pool takes the prefix cache with it.
        New requests are refused until everything is resumed (``Scheduler.released``)."""
        try:
            freed = self.worker_call(call)
        except WorkerCallError as e:
            return {"success": False, "message": f"Failed to release memory: {e}"}
        if "kv_cache" in call.tags:
            self.sched.drop_cache_for_new_weights()
        self.sched.released |= set(call.tags) & {"weights", "kv_cache", "cuda_graph"}
        return {"success": True, "message": "", **freed}

    def resume_memory(self, call: ResumeMemoryOccupation) -> Reply:
        try:
            result = self.worker_call(call)
        except WorkerCallError as e:
            return Reply(call_id=call.call_id, ok=False, error=f"Failed to resume memory: {e}")
        self.sched.released -= set(call.tags)
        self.sched.admission_paused = self.paused()
        return Reply(call_id=call.call_id, ok=True, result=result)

    def flush_outputs(self) -> None:
        for rid, kind, message in self.sched.take_errors():
            self.inbox.send(ReqError(kind=kind, message=message, rids=[rid]))
        outs = self.sched.take_outputs()
        if outs:
            self.to_detok.send(TokenOutBatch(outs=outs))


def main(spec: ChildSpec, ctx: zmq.Context, inbox: Sender) -> None:
    SchedulerLoop(spec, ctx, inbox).serve()
