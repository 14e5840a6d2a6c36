"""The scheduler process: its sockets and event loop around ``Scheduler``."""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

import msgspec
import zmq

from treadle.runtime.hf_config import eos_token_ids, load_config, load_tokenizer
from treadle.runtime.messages import (
    SCHEDULER_IN, AbortReq, ChildReady, ControlReply, ControlReq, FreezeGC, ReqError, Shutdown, StepResult, SyncStep,
    TokenizedBatch, TokenOutBatch, WorkerControl, WorkerControlReply,
)
from treadle.runtime.procs import ChildSpec
from treadle.runtime.server_args import LORA_NOT_ENABLED
from treadle.runtime.zmq_utils import Receiver, Sender
from treadle.scheduler_proc.scheduler import Scheduler

logger = logging.getLogger("treadle.scheduler")
IDLE_POLL_MS = 1000
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
        tokenizer = load_tokenizer(spec.files.tokenizer_dir, self.args.trust_remote_code, self.args.tokenizer_mode)
        worker_info = self.worker_call("info")
        hidden_size = int(load_config(spec.files.model_dir).get("hidden_size", 0))
        self.sched = Scheduler(self.args, tokenizer, eos_token_ids(spec.files.model_dir, tokenizer), worker_info,
                               hidden_size, tokenizer_dir=spec.files.tokenizer_dir)
        self.worker_info = worker_info
        self.running = True

    def worker_call(self, method: str, **args: Any) -> Any:
        """A blocking control call (start-up info, profiling...) answered by the reporting worker
        (TP rank 0 of the last stage)."""
        for w in self.to_workers:
            w.send(WorkerControl(call_id=0, method=method, args=args))
        while True:
            msg = self.results.recv()
            if isinstance(msg, StepResult):  # a step in flight finished first: keep it for wait_step
                self.early_results[msg.step] = msg
            elif isinstance(msg, WorkerControlReply):
                if not msg.ok:
                    raise RuntimeError(f"worker call {method} failed: {msg.error}")
                return msg.result

    def serve(self) -> None:
        info = {**self.sched.internal_state(), "worker": self.worker_info}
        self.inbox.send(ChildReady(name=self.spec.name, info=info))
        # Overlap scheduling keeps two steps in flight: step N+1 is planned and sent before the
        # result of step N is applied (its decode inputs are placeholders the worker fills).
        # Pipeline parallelism keeps pp_size micro-batches in flight, one per stage.
        depth = self.sched.max_plans_in_flight
        while self.running:
            self.drain_inputs(block=self.sched.is_idle() and not self.sched.plans_in_flight)
            plan = self.sched.schedule() if len(self.sched.plans_in_flight) < depth else None
            if plan is not None:
                for w in self.to_workers:
                    w.send(plan)
            if self.sched.plans_in_flight and (plan is None or len(self.sched.plans_in_flight) >= depth):
                if plan is None:  # nothing to queue behind the last step: ask for its result now
                    for w in self.to_workers:
                        w.send(SyncStep())
                oldest = self.sched.plans_in_flight[0].step
                result = self.wait_step(oldest)
                self.sched.apply_result(result.next_token_ids, result.extras, step=oldest)
            elif plan is None and not self.sched.is_idle():
                self.sched.grammars.wait(GRAMMAR_POLL_S)  # only compiling requests wait: sleep, don't spin
            self.flush_outputs()
            self.sched.expire_sessions()
            for name in self.sched.finished_lora_unloads():
                self.worker_call("unload_lora", name=name)
            if self.sched.is_idle():
                self.sched.check_integrity()
        self.sched.grammars.shutdown()
        for w in self.to_workers:
            w.send(Shutdown())
        self.to_detok.send(Shutdown())

    def wait_step(self, step: int) -> StepResult:
        """The result of ``step``. Watchdog: a step that takes more than ``watchdog_timeout`` s means
        a worker is stuck (a hung collective, a processor that never returns); the scheduler then
        fails, which the client reports as the engine's death, instead of every call hanging."""
        if step in self.early_results:
            return self.early_results.pop(step)
        deadline = time.monotonic() + self.args.watchdog_timeout
        while True:
            msg = self.results.recv(max(1, int((deadline - time.monotonic()) * 1000)))
            if msg is None:
                raise RuntimeError(f"step {step} ran for more than watchdog_timeout={self.args.watchdog_timeout:g} s: "
                                   "a worker is stuck; the engine stops")
            if isinstance(msg, StepResult) and msg.step == step:
                return msg
            if isinstance(msg, StepResult):
                raise RuntimeError(f"the worker answered step {msg.step} while step {step} was expected")

    def drain_inputs(self, block: bool) -> None:
        first = True
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
        elif isinstance(msg, ControlReq):
            self.inbox.send(self.control(msg))
        elif isinstance(msg, Shutdown):
            self.running = False

    def control(self, msg: ControlReq) -> ControlReply:
        if msg.method == "get_internal_state":
            return ControlReply(call_id=msg.call_id, ok=True, result=self.sched.internal_state())
        if msg.method == "flush_cache":
            return ControlReply(call_id=msg.call_id, ok=True, result={"success": self.sched.flush_cache()})
        if msg.method == "open_session":
            result = self.sched.open_session(msg.args["session_id"], msg.args.get("timeout"),
                                             bool(msg.args.get("streaming", False)))
            return ControlReply(call_id=msg.call_id, ok=True, result=result)
        if msg.method == "open_session_ids":
            return ControlReply(call_id=msg.call_id, ok=True, result=sorted(self.sched.sessions.sessions))
        if msg.method == "close_session":
            return ControlReply(call_id=msg.call_id, ok=True, result=self.sched.close_session(msg.args["session_id"]))
        if msg.method == "freeze_gc":
            gc.freeze()
            self.to_detok.send(FreezeGC())
            return ControlReply(call_id=msg.call_id, ok=True, result=True)
        if msg.method == "check_integrity":
            try:
                self.sched.check_integrity()
                if self.sched.cache is not None and self.sched.is_idle():
                    self.sched.cache.check()
            except AssertionError as e:
                return ControlReply(call_id=msg.call_id, ok=False, error=f"integrity check failed: {e}")
            return ControlReply(call_id=msg.call_id, ok=True, result=self.sched.internal_state())
        if msg.method == "load_lora_adapter":
            return ControlReply(call_id=msg.call_id, ok=True, result=self.load_lora(**msg.args))
        if msg.method == "unload_lora_adapter":
            return ControlReply(call_id=msg.call_id, ok=True, result=self.unload_lora(**msg.args))
        if msg.method in ("start_profile", "stop_profile"):
            try:
                return ControlReply(call_id=msg.call_id, ok=True, result=self.worker_call(msg.method, **msg.args))
            except RuntimeError as e:
                return ControlReply(call_id=msg.call_id, ok=False, error=str(e))
        return ControlReply(call_id=msg.call_id, ok=False, error=f"unknown control method {msg.method!r}")

    def load_lora(self, lora_name: str, lora_path: str, pinned: bool = False) -> dict[str, Any]:
        """Every worker reads the adapter into host memory (the reporting one answers for all: the
        ranks read the same files); errors are returned, not raised, as SGLang's LoRAUpdateOutput."""
        lora = self.sched.lora
        if lora.num_slots == 0:
            return {"success": False, "error_message": LORA_NOT_ENABLED}
        if lora.serves(lora_name):
            return {"success": False, "error_message": f"The LoRA adapter {lora_name} is already loaded. "
                                                       "Unload it first or use another name."}
        if pinned and len(lora.pinned) + 1 >= lora.num_slots:
            return {"success": False, "error_message": f"At most max_loras_per_batch - 1 = {lora.num_slots - 1} "
                                                       "adapters can be pinned."}
        try:
            self.worker_call("load_lora", name=lora_name, path=lora_path)
        except RuntimeError as e:
            return {"success": False, "error_message": str(e).removeprefix("worker call load_lora failed: ")}
        lora.load(lora_name, lora_path, pinned)
        return {"success": True, "loaded_adapters": lora.serving()}

    def unload_lora(self, lora_name: str) -> dict[str, Any]:
        """New requests for the name are refused at once; the workers drop it once no queued or
        running request uses it (see ``LoraSlots``)."""
        lora = self.sched.lora
        if not lora.serves(lora_name):
            return {"success": False, "error_message": f"LoRA with name {lora_name} does not exist. Loaded LoRAs: "
                                                       f"{sorted(lora.serving())}"}
        lora.unload(lora_name)
        return {"success": True, "loaded_adapters": lora.serving()}

    def flush_outputs(self) -> None:
        for rid, kind, message in self.sched.take_errors():
            self.inbox.send(ReqError(kind=kind, message=message, rids=[rid]))
        outs = self.sched.take_outputs()
        if outs:
            self.to_detok.send(TokenOutBatch(outs=outs))


def main(spec: ChildSpec, ctx: zmq.Context, inbox: Sender) -> None:
    SchedulerLoop(spec, ctx, inbox).serve()
