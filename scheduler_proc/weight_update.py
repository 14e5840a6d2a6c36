"""A weight update in the scheduler, once no request runs (scheduler_proc/main.py drains first).

With one DP group the workers check the new weights and load them in one call (``phase="both"``).
With several, the client checks on every group first (``phase="check"``) and loads only if all
passed (client/weight_fanout.py): a group whose check passed stays paused, holding the update, for
the client's ``FinishWeightUpdate``, so no request runs on the new weights before every group has
them and the engine's ``weight_version`` names them.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import msgspec

from treadle.runtime.messages import Call, FinishWeightUpdate
from treadle.scheduler_proc.control import WorkerCallError
from treadle.scheduler_proc.scheduler import Scheduler

logger = logging.getLogger("treadle.scheduler")


class WeightUpdate:
    def __init__(self, sched: Scheduler, worker_call: Callable[[Call], Any]) -> None:
        self.sched = sched
        self.worker_call = worker_call  # blocking: the reporting worker's result, or WorkerCallError
        self.held: Optional[Call] = None  # a checked update waiting for FinishWeightUpdate: admission stays paused

    def run(self, call: Call) -> dict[str, Any]:
        """Every worker checks (and, with ``phase="both"``, copies in) the new weights; the prefix
        cache built with the old ones is dropped once they are in."""
        try:
            self.worker_call(call)
        except WorkerCallError as e:
            return {"success": False, "message": f"Failed to update weights: {e}. The old weights are still served."}
        if call.phase == "check":
            self.held = call
            return {"success": True, "message": "The new weights passed their check."}
        self._drop_cache(call)
        return {"success": True, "message": "Succeeded to update model weights."}

    def finish(self, call: FinishWeightUpdate) -> dict[str, Any]:
        """``apply``: load the held update (the group stays paused); ``end``: forget it and let
        requests run again. An ``end`` with nothing held (this group's check failed) does nothing."""
        held = self.held
        if call.action not in ("apply", "end"):
            return {"success": False, "message": f"FinishWeightUpdate: action must be 'apply' or 'end', "
                                                 f"got {call.action!r}."}
        if call.action == "end":
            self.held = None
            if held is not None:
                try:  # a distributed update's received tensors go
                    self.worker_call(msgspec.structs.replace(held, phase="drop"))
                except WorkerCallError as e:
                    logger.warning("dropping a checked weight update failed: %s", e)
            return {"success": True, "message": ""}
        if held is None:
            return {"success": False, "message": "No checked weight update is held to apply."}
        try:
            self.worker_call(msgspec.structs.replace(held, phase="apply"))
        except WorkerCallError as e:
            self._drop_cache(held)  # some tensors may be new already: the old weights' KV must not serve them
            return {"success": False, "message": f"Failed to load the new weights after they passed their check: "
                                                 f"{e}. This group's weights may now be partly new (the load "
                                                 "stopped partway)."}
        self._drop_cache(held)
        return {"success": True, "message": "Succeeded to update model weights."}

    def _drop_cache(self, call: Call) -> None:
        if getattr(call, "flush_cache", True):
            self.sched.drop_cache_for_new_weights()
