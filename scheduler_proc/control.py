"""The scheduler's control calls: one handler per ``Call`` type (runtime/messages.py), looked up
in a table, each returning the ``Reply`` result; calls for the workers (profiling, LoRA
adapters) are handed on to every rank of the group and answered by the reporting one."""

from __future__ import annotations

import gc
from typing import Any, Callable

from treadle.runtime.messages import (
    Call, CheckIntegrity, CloseSession, DestroyWeightsUpdateGroup, DropLoraAdapter, FlushCache, FreezeGC,
    GetInternalState, GetWeightsByName, InitWeightsUpdateGroup, ListSessions, LoadLoraAdapter, OpenSession, ReadLoraAdapter, Reply, StartProfile, StopProfile, UnloadLoraAdapter,
)
from treadle.runtime.lora_args import LORA_NOT_ENABLED
from treadle.runtime.zmq_utils import Sender
from treadle.scheduler_proc.scheduler import Scheduler


class WorkerCallError(RuntimeError):
    """A call the workers answered with an error (its text is the worker's)."""


class SchedulerControl:
    def __init__(self, sched: Scheduler, worker_call: Callable[[Call], Any], to_detok: Sender) -> None:
        self.sched = sched
        self.worker_call = worker_call  # blocking: the reporting worker's result, or WorkerCallError
        self.to_detok = to_detok
        self.handlers: dict[type, Callable[[Any], Any]] = {
            GetInternalState: lambda c: sched.internal_state(),
            CheckIntegrity: self.check_integrity,
            FlushCache: lambda c: {"success": sched.flush_cache()},
            OpenSession: lambda c: sched.sessions.open(c.session_id, c.timeout, c.streaming),
            ListSessions: lambda c: sorted(sched.sessions.table.sessions),
            CloseSession: lambda c: sched.sessions.close(c.session_id),
            FreezeGC: self.freeze_gc,
            LoadLoraAdapter: self.load_lora,
            UnloadLoraAdapter: self.unload_lora,
            StartProfile: worker_call,
            GetWeightsByName: worker_call,
            InitWeightsUpdateGroup: worker_call,  # blocks this loop until the trainer has joined too
            DestroyWeightsUpdateGroup: worker_call,
            StopProfile: worker_call,
        }

    def answer(self, call: Call) -> Reply:
        handler = self.handlers.get(type(call))
        if handler is None:
            return Reply(call_id=call.call_id, ok=False, error=f"the scheduler takes no {type(call).__name__} call")
        try:
            return Reply(call_id=call.call_id, ok=True, result=handler(call))
        except (AssertionError, WorkerCallError) as e:
            return Reply(call_id=call.call_id, ok=False, error=str(e))

    def check_integrity(self, call: CheckIntegrity) -> dict[str, Any]:
        try:
            self.sched.check_integrity()
            if self.sched.is_idle():
                self.sched.cache.check()
        except AssertionError as e:
            raise AssertionError(f"integrity check failed: {e}") from None
        return self.sched.internal_state()

    def freeze_gc(self, call: FreezeGC) -> bool:
        gc.freeze()
        self.to_detok.send(FreezeGC())
        return True

    def load_lora(self, call: LoadLoraAdapter) -> dict[str, Any]:
        """Every worker reads the adapter into host memory (the reporting one answers for all: the
        ranks read the same files); errors are returned, not raised, as SGLang's LoRAUpdateOutput.
        An adapter being unloaded but still held is served again without a read (same path)."""
        lora, name = self.sched.lora, call.lora_name
        if lora.num_slots == 0:
            return {"success": False, "error_message": LORA_NOT_ENABLED}
        if lora.serves(name):
            return {"success": False, "error_message": f"The LoRA adapter {name} is already loaded. "
                                                       "Unload it first or use another name."}
        if call.pinned and len(lora.pinned - {name}) + 1 >= lora.num_slots:
            return {"success": False, "error_message": f"At most max_loras_per_batch - 1 = {lora.num_slots - 1} "
                                                       "adapters can be pinned."}
        held = lora.still_held(name)
        if held is not None and held != call.lora_path:  # its requests run on the old weights, in its slot
            return {"success": False, "error_message": f"The LoRA adapter {name} is still being unloaded (requests "
                                                       f"that use {held} are running). Load {call.lora_path} under "
                                                       "another name, or once they finish."}
        if held is None:
            try:
                self.worker_call(ReadLoraAdapter(name=name, path=call.lora_path))
            except WorkerCallError as e:
                return {"success": False, "error_message": str(e)}
        lora.load(name, call.lora_path, call.pinned)
        return {"success": True, "loaded_adapters": lora.serving()}

    def unload_lora(self, call: UnloadLoraAdapter) -> dict[str, Any]:
        """New requests for the name are refused at once; the workers drop it once no queued or
        running request uses it (see ``LoraSlots`` and ``SchedulerLoop.serve``)."""
        lora = self.sched.lora
        if not lora.serves(call.lora_name):
            return {"success": False, "error_message": f"LoRA with name {call.lora_name} does not exist. "
                                                       f"Loaded LoRAs: {sorted(lora.serving())}"}
        lora.unload(call.lora_name)
        return {"success": True, "loaded_adapters": lora.serving()}

    def drop_unused_adapters(self) -> None:
        for name in self.sched.finished_lora_unloads():
            self.worker_call(DropLoraAdapter(name=name))
