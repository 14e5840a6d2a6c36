"""A weight update with several DP groups: check on every group, load only if all passed.

Each group is a scheduler with workers of its own, and SGLang's user expects one model behind the
engine: one ``weight_version``, the same weights in every group. Sent as one call to every group,
an update that one group refuses (a tensor of a wrong shape fails the workers' check, a group has
its weights released) would change the others. So the update goes in steps
(scheduler_proc/weight_update.py):

1. ``phase="check"``: each group drains its running requests and its workers check the new
   weights (names, shapes, dtypes, on a meta-device copy of the model; a distributed update's
   tensors are received and kept); a group that passed stays paused.
2. If any group refused, no group loads anything: every group keeps the old weights and the
   version stays; the message names each refusing group and its reason.
3. Else ``FinishWeightUpdate("apply")`` on every group. A load can still fail after its check
   (an I/O error halfway through a checkpoint): then the groups differ, the version stays, and the
   message says which group holds which weights and that the update must be sent again. Nothing
   is rolled back: the old weights are gone from a group once its load began.
4. ``FinishWeightUpdate("end")`` on every group, always: requests run again. The version moves
   (``on_applied``) before it, so every request that runs on the new weights reports them.

A group that goes out of service meanwhile (its process died: client/supervisor.py) serves
nothing afterwards; the groups left decide, and the message says so.
"""

from __future__ import annotations

from typing import Any, Callable

import msgspec

from treadle.runtime.errors import EngineDeadError
from treadle.runtime.messages import Call, FinishWeightUpdate

# one step on every live group -> each group's answer ({"success", "message"}), or the EngineDeadError
# of a group that went out of service during it
Ask = Callable[[Call], dict[int, Any]]


def update_groups(ask: Ask, call: Call, on_applied: Callable[[], None], version: str) -> tuple[bool, str]:
    """``(success, message)`` of ``call`` (an ``UpdateWeightsFrom*``) on every group, as above;
    ``version`` is the engine's ``weight_version`` now, which a failure leaves in place."""
    checked = ask(msgspec.structs.replace(call, phase="check"))
    gone = _gone(checked, set(checked))
    try:
        refused = _failed(checked)
        if refused:
            return False, (" ".join(f"DP group {g}: {m}" for g, m in refused.items())
                           + f" No DP group changed its weights: every group serves the old ones and "
                           f"weight_version stays {version!r}." + _gone_note(gone))
        applied = ask(FinishWeightUpdate(action="apply"))
        gone |= _gone(applied, set(checked) - gone)
        failed = _failed(applied)
        if not failed:
            on_applied()
            return True, next(r["message"] for r in applied.values() if isinstance(r, dict)) + _gone_note(gone)
        ok = sorted(g for g, r in applied.items() if isinstance(r, dict) and r["success"])
        states = [f"group {g} serves the new weights" for g in ok]
        states += [f"group {g} may serve a mix of old and new weights (its load stopped partway)" for g in failed]
        return False, (" ".join(f"DP group {g}: {m}" for g, m in failed.items())
                       + f" The DP groups now differ: {'; '.join(states)}. weight_version stays {version!r} "
                       "until an update succeeds on every group. Retry the update: every group loads the whole "
                       "of it again." + _gone_note(gone))
    finally:
        ask(FinishWeightUpdate(action="end"))


def _failed(answers: dict[int, Any]) -> dict[int, str]:
    """The groups (in service) that answered with a failure, and their messages."""
    return {g: r["message"] for g, r in sorted(answers.items()) if isinstance(r, dict) and not r["success"]}


def _gone(answers: dict[int, Any], asked: set[int]) -> set[int]:
    """The groups of ``asked`` out of service by now: absent from ``answers``, or failed by their
    death. Raises when none is left (the engine is dead then)."""
    dead = {g for g, r in answers.items() if isinstance(r, EngineDeadError)}
    if answers and len(dead) == len(answers):
        raise next(iter(answers.values()))
    return dead | (asked - set(answers))


def _gone_note(gone: set[int]) -> str:
    if not gone:
        return ""
    return (f" (DP group(s) {sorted(gone)} went out of service during the update and serve nothing; "
            "the others decided.)")
