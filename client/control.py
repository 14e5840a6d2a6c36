"""Control calls: the request/reply calls beside generation (flush the cache, sessions, LoRA
adapters, profiling, server state), each a typed ``Call`` (runtime/messages.py) answered by a ``Reply``.

Every call goes to each DP group asked (default: every live one; -1 is the tokenizer's router),
one copy of the call with its own call id per group, so a group that dies fails only its own call;
the replies come back by group. The rest of the client calls the named methods of ``Control``.

Each call waits ``CONTROL_TIMEOUT_S`` for its answer (the processes answer between steps), except
those that answer only when their work is done, however long it takes (``stop_profile`` writes the
traces first). Those wait without a deadline: the heartbeats prove the processes alive meanwhile,
and one that dies or freezes fails the call with ``EngineDeadError`` naming it (client/supervisor.py).
"""

from __future__ import annotations

import concurrent.futures
import re
import threading
import time
from typing import Any, Callable, Optional

import msgspec

from treadle.client.calls import Calls
from treadle.client.supervisor import Supervisor, group_name
from treadle.client.weight_fanout import update_groups
from treadle.runtime.errors import EngineDeadError
from treadle.runtime.messages import (
    Call, CheckIntegrity, CloseSession, FinishWeightUpdate, FlushCache, FreezeGC, GetInternalState, GetLoad,
    ListSessions, LoadLoraAdapter, GetWeightsByName, InitWeightsUpdateGroup, OpenSession, ReleaseMemoryOccupation,
    ResumeMemoryOccupation, StartProfile, StopProfile, UnloadLoraAdapter, UpdateWeightsFromDisk,
    UpdateWeightsFromDistributed, UpdateWeightsFromTensor,
)
from treadle.runtime.profile_args import check_profile_args
from treadle.runtime.redact import redact
from treadle.runtime.resolve_args import MEM_FRACTION_STATIC
from treadle.runtime.server_args import ServerArgs

CONTROL_TIMEOUT_S = 60.0
# answered once their work is done (a weight update waits for the running requests, a group waits for the
# trainer to join, a resume may capture CUDA graphs again): no deadline
UNBOUNDED_CALLS = (StopProfile, UpdateWeightsFromDisk, UpdateWeightsFromTensor, UpdateWeightsFromDistributed,
                   InitWeightsUpdateGroup, ReleaseMemoryOccupation, ResumeMemoryOccupation, FinishWeightUpdate)
# the scheduler waits on its workers to answer
WORKER_CALLS = (StartProfile, StopProfile, LoadLoraAdapter, GetWeightsByName, InitWeightsUpdateGroup,
                ReleaseMemoryOccupation, ResumeMemoryOccupation, FinishWeightUpdate)


class ControlTimeoutError(TimeoutError):
    """A control call that got no answer in time; the message names the call and the process."""


def call_name(call: Call) -> str:
    """The call's name as the user knows it: ``StopProfile`` -> ``stop_profile``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(call).__name__).lower()


def timeout_message(call: Call, group: int, timeout: float) -> str:
    """Why a call failed: which call, which process did not answer (it is alive: a dead or silent
    one fails the call with ``EngineDeadError`` instead), and for how long."""
    if group == -1:
        who = "the tokenizer process"
    else:
        who = f"the {group_name(group, 'scheduler')} process (DP group {group})"
        if isinstance(call, WORKER_CALLS):
            who += " or the worker processes it waits on for this call"
    return (f"{call_name(call)}: no answer from {who} within {timeout:g} s; the processes are alive "
            "(their heartbeats go on), so it is busy or stuck")


class FlushCacheReqOutput:
    def __init__(self, success: bool, message: str = "") -> None:
        self.success, self.message = success, message

    def __bool__(self) -> bool:
        return self.success

    def __repr__(self) -> str:
        return f"FlushCacheReqOutput(success={self.success}, message={self.message!r})"


class Control:
    def __init__(self, calls: Calls, sup: Supervisor) -> None:
        self.calls = calls
        self.sup = sup
        self.weights_lock = threading.Lock()  # one weight update at a time across DP groups (its steps interleave)

    def each(self, call: Call, groups: Optional[list[int]] = None,
             on_answer: Optional[Callable[[Any], None]] = None, settle: bool = False) -> dict[int, Any]:
        """``call`` on each of ``groups`` (default: every live DP group; -1 is the tokenizer),
        results by group. Each group gets its own call id, so a group that dies fails its own call
        (``settle``: its result is then that ``EngineDeadError``, and the others' answers still come).
        A group that does not answer in time raises ``ControlTimeoutError`` naming the call and process."""
        self.calls.check_alive()
        futs = {}
        for g in self.sup.live_groups() if groups is None else groups:
            call_id = self.calls.next_id()
            futs[g] = self.sup.add_control(call_id, g)
            if on_answer is not None:  # runs on the I/O thread, before any output that follows the answer
                futs[g].add_done_callback(lambda f: f.exception() is None and on_answer(f.result()))
            self.calls.socket.send(msgspec.structs.replace(call, call_id=call_id, dp_rank=g))
        unbounded = isinstance(call, UNBOUNDED_CALLS)
        timeout = CONTROL_TIMEOUT_S
        deadline = time.monotonic() + timeout  # one bound for the whole call, not one per group
        results = {}
        for g, fut in futs.items():
            try:
                results[g] = fut.result(timeout=None if unbounded else max(0.0, deadline - time.monotonic()))
            except concurrent.futures.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                raise ControlTimeoutError(timeout_message(call, g, timeout)) from None
            except EngineDeadError as e:
                if not settle:
                    raise
                results[g] = e
        return results

    def first(self, call: Call) -> Any:
        """``call`` on every live DP group; returns the first group's result."""
        return next(iter(self.each(call).values()))

    def live_groups(self) -> list[int]:
        return self.sup.live_groups()

    # ------------------------------------------------------------------ the calls
    def flush_cache(self) -> FlushCacheReqOutput:
        ok = all(res.get("success") for res in self.each(FlushCache()).values())
        return FlushCacheReqOutput(ok, "" if ok else "Cache not flushed because there is pending work.")

    def freeze_gc(self) -> None:
        self.first(FreezeGC())

    def start_profile(self, args: dict[str, Any]) -> None:
        check_profile_args(args)  # a bad argument fails here, before any worker starts
        self.first(StartProfile(options=args))

    def stop_profile(self) -> None:
        self.first(StopProfile())

    def open_session(self, group: int, session_id: str, timeout: Optional[float], streaming: bool) -> bool:
        """Open a session in DP group ``group``; False if that id is already open there."""
        return self.each(OpenSession(session_id=session_id, timeout=timeout, streaming=streaming), [group])[group]

    def open_session_ids(self) -> set[str]:
        """The ids of the sessions open in any live group."""
        return set().union(*self.each(ListSessions()).values())

    def close_session(self, session_id: str, groups: Optional[list[int]] = None) -> None:
        self.each(CloseSession(session_id=session_id), groups)

    def load_lora_adapter(self, lora_name: str, lora_path: str, pinned: bool) -> dict[int, Any]:
        """Each live group's answer (``{"success": ..., "error_message": ...}``)."""
        return self.each(LoadLoraAdapter(lora_name=lora_name, lora_path=lora_path, pinned=pinned))

    def unload_lora_adapter(self, lora_name: str, groups: Optional[list[int]] = None) -> None:
        self.each(UnloadLoraAdapter(lora_name=lora_name), groups)

    def update_weights(self, call: Call, on_success: Callable[[], None]) -> tuple[bool, str]:
        """An ``UpdateWeightsFrom*`` call: its workers take the new weights once its running requests
        end; ``on_success`` (it sets the next ``weight_version``) runs on the I/O thread as the group
        answers that its weights changed. With several live DP groups, checked on every group before
        any loads, and ``on_success`` runs once all have (client/weight_fanout.py)."""
        if len(self.live_groups()) > 1:
            with self.weights_lock:
                return update_groups(lambda c: self.each(c, settle=True), call, on_success,
                                     self.calls.server_args.weight_version)
        results = list(self.each(call, on_answer=lambda res: res.get("success") and on_success()).values())
        failed = [r["message"] for r in results if not r["success"]]
        return not failed, failed[0] if failed else results[0]["message"]

    def check_integrity(self) -> dict[str, Any]:
        """The first group's internal state, after it asserted that nothing leaked (tests use it)."""
        return self.first(CheckIntegrity())

    def server_info(self, server_args: ServerArgs, model_dir: str, startup_time: float) -> dict[str, Any]:
        """``get_server_info()``: the engine's arguments (secrets masked: ``runtime/redact.py``) plus
        what the processes report."""
        states = self.each(GetInternalState())
        state = next(iter(states.values()))
        worker = self.sup.ready_info.get("worker0", {})
        info = redact(server_args.to_dict())
        info.update({
            "model_path": server_args.model_path, "resolved_model_dir": model_dir,
            "tokenizer_path": server_args.tokenizer_path, "max_total_tokens": state["max_total_tokens"],
            "max_running_requests": state["max_running_requests"], "context_length": state["context_length"],
            "page_size": state["page_size"], "device": server_args.device, "dtype": worker.get("dtype"),
            "startup_time": startup_time, "version": _version(),
            "weight_bytes": worker.get("weight_bytes"),  # worker 0's weights on its device (4-bit: packed bytes)
            "kv_bytes": worker.get("kv_bytes"),  # worker 0's KV pool on its device
            "internal_states": [{**s, "dp_rank": g} for g, s in states.items()],  # one per live DP group
        })
        if info["mem_fraction_static"] is None:  # CUDA: the share a measured prefill left (gpu_worker/kv_sizing.py)
            info["mem_fraction_static"] = worker.get("kv_sizing", {}).get("mem_fraction_static", MEM_FRACTION_STATIC)
        if server_args.dp_size > 1:  # per group: alive, error (why not), requests in flight, served
            info["dp_groups"] = self.each(GetLoad(), [-1])[-1]
        return info


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("treadle")
    except PackageNotFoundError:
        return "0.0.0"
