"""A weight update across DP groups (client/weight_fanout.py), against fake groups: each is the
scheduler's own ``WeightUpdate`` (scheduler_proc/weight_update.py) over fake workers whose check or
load can be made to fail, so the whole protocol runs without processes: check on every group,
load only if all passed, the version moved once and before any group serves again, and a load
that fails after its check reported as groups that differ."""

from __future__ import annotations

from typing import Any, Optional

import msgspec
import pytest

from treadle.client.weight_fanout import update_groups
from treadle.runtime.errors import EngineDeadError
from treadle.runtime.messages import Call, FinishWeightUpdate, UpdateWeightsFromDisk, UpdateWeightsFromDistributed
from treadle.scheduler_proc.control import WorkerCallError
from treadle.scheduler_proc.weight_update import WeightUpdate


class FakeGroup:
    """One DP group: a real ``WeightUpdate`` over workers that hold "old", "new" or "mixed" weights."""

    def __init__(self, check_error: str = "", load_error: str = "") -> None:
        self.weights, self.check_error, self.load_error = "old", check_error, load_error
        self.phases: list[str] = []  # what the workers were asked, in order
        self.cache_drops = 0
        self.update = WeightUpdate(self, self.worker_call)  # type: ignore[arg-type]  # self plays the Scheduler

    def drop_cache_for_new_weights(self) -> None:
        self.cache_drops += 1

    def worker_call(self, call: Call) -> Any:
        self.phases.append(call.phase)
        if call.phase in ("check", "both") and self.check_error:
            raise WorkerCallError(self.check_error)
        if call.phase in ("apply", "both"):
            if self.load_error:
                self.weights = "mixed"  # the load stopped partway
                raise WorkerCallError(self.load_error)
            self.weights = "new"
        return True

    def answer(self, call: Call) -> dict[str, Any]:
        return self.update.finish(call) if isinstance(call, FinishWeightUpdate) else self.update.run(call)

    @property
    def paused(self) -> bool:
        return self.update.held is not None


class Engine:
    """The client's side: ``ask`` sends a step to every live group; ``version`` is the engine's."""

    def __init__(self, groups: dict[int, FakeGroup], die: Optional[tuple[int, str]] = None) -> None:
        self.groups, self.die = groups, die  # die: (group, step) that group's process dies at
        self.version, self.steps = "0", []
        self.paused_when_applied: list[bool] = []

    def ask(self, call: Call) -> dict[int, Any]:
        step = call.action if isinstance(call, FinishWeightUpdate) else call.phase
        self.steps.append(step)
        out: dict[int, Any] = {}
        for g, group in list(self.groups.items()):
            if self.die == (g, step):
                del self.groups[g]  # out of service from now on: later steps do not ask it
                out[g] = EngineDeadError(f"The dp{g}_worker0 process exited. DP group {g} is out of service")
            else:
                out[g] = group.answer(call)
        return out

    def update(self, call: Call, version: Optional[str] = None) -> tuple[bool, str]:
        def applied() -> None:
            self.paused_when_applied = [g.paused for g in self.groups.values()]
            self.version = version or str(int(self.version) + 1)

        return update_groups(self.ask, call, applied, self.version)


DISK = UpdateWeightsFromDisk(model_dir="/ckpt/step1")


def test_every_group_checks_then_loads_and_the_version_moves_once_before_any_serves():
    groups = {0: FakeGroup(), 1: FakeGroup()}
    eng = Engine(groups)
    assert eng.update(DISK) == (True, "Succeeded to update model weights.")
    assert eng.steps == ["check", "apply", "end"] and eng.version == "1"
    assert eng.paused_when_applied == [True, True]  # no group served the new weights under the old version
    for g in groups.values():
        assert g.phases == ["check", "apply", "drop"] and g.weights == "new" and g.cache_drops == 1 and not g.paused


def test_a_refused_check_on_one_group_changes_no_group():
    groups = {0: FakeGroup(), 1: FakeGroup(check_error="ValueError: 'model.layers.0.mlp.up_proj.weight': shape "
                                                       "[3, 3] does not match [1536, 576]")}
    eng = Engine(groups)
    ok, message = eng.update(DISK)
    assert not ok and eng.steps == ["check", "end"] and eng.version == "0"
    assert message.startswith("DP group 1: Failed to update weights: ValueError: 'model.layers.0.mlp.up_proj.weight'")
    assert "The old weights are still served." in message and "DP group 0" not in message
    assert "No DP group changed its weights: every group serves the old ones and weight_version stays '0'." in message
    for g in groups.values():  # group 0 passed and held the update; the end let it go
        assert g.weights == "old" and g.cache_drops == 0 and not g.paused
    assert groups[0].phases == ["check", "drop"] and groups[1].phases == ["check"]
    # the next update that every group passes takes the next number
    groups[1].check_error = ""
    assert eng.update(DISK)[0] and eng.version == "1" and {g.weights for g in groups.values()} == {"new"}


def test_a_load_that_fails_after_its_check_reports_how_the_groups_differ():
    groups = {0: FakeGroup(), 1: FakeGroup(load_error="OSError: [Errno 5] Input/output error"), 2: FakeGroup()}
    eng = Engine(groups)
    ok, message = eng.update(DISK, version="step1")
    assert not ok and eng.steps == ["check", "apply", "end"] and eng.version == "0"
    assert [groups[g].weights for g in (0, 1, 2)] == ["new", "mixed", "new"]
    assert message.startswith("DP group 1: Failed to load the new weights after they passed their check: OSError: "
                              "[Errno 5] Input/output error. This group's weights may now be partly new")
    assert ("The DP groups now differ: group 0 serves the new weights; group 2 serves the new weights; group 1 may "
            "serve a mix of old and new weights (its load stopped partway). weight_version stays '0'") in message
    assert "Retry the update" in message
    assert all(not g.paused and g.cache_drops == 1 for g in groups.values())  # no old KV serves the new weights
    groups[1].load_error = ""  # the retry brings every group to the same weights, and the version moves
    assert eng.update(DISK, version="step1") == (True, "Succeeded to update model weights.")
    assert eng.version == "step1" and {g.weights for g in groups.values()} == {"new"}


@pytest.mark.parametrize("step", ["check", "apply"])
def test_a_group_that_dies_during_the_update_leaves_the_others_to_decide(step):
    groups = {0: FakeGroup(), 1: FakeGroup()}
    eng = Engine(groups, die=(1, step))
    ok, message = eng.update(DISK)
    assert ok and eng.version == "1" and groups[0].weights == "new" and not groups[0].paused, message
    assert "DP group(s) [1] went out of service during the update" in message


def test_an_engine_with_no_group_left_raises_and_a_failed_step_still_ends_the_update():
    eng = Engine({0: FakeGroup()}, die=(0, "check"))
    with pytest.raises(EngineDeadError, match="dp0_worker0"):
        eng.update(DISK)
    groups = {0: FakeGroup(), 1: FakeGroup()}
    eng = Engine(groups)
    real_ask = eng.ask

    def ask(call: Call) -> dict[int, Any]:
        if isinstance(call, FinishWeightUpdate) and call.action == "apply":
            raise KeyboardInterrupt  # the caller gave up between the steps
        return real_ask(call)

    with pytest.raises(KeyboardInterrupt):
        update_groups(ask, DISK, lambda: None, "0")
    assert eng.steps == ["check", "end"] and not any(g.paused for g in groups.values())
    assert all(g.weights == "old" for g in groups.values())


def test_the_scheduler_side_keeps_a_distributed_update_until_applied_or_dropped():
    group = FakeGroup()
    call = UpdateWeightsFromDistributed(names=["model.norm.weight"], dtypes=["float32"], shapes=[[4]],
                                        flush_cache=False, phase="check")
    assert group.update.finish(FinishWeightUpdate(action="apply")) == {
        "success": False, "message": "No checked weight update is held to apply."}
    assert group.update.finish(FinishWeightUpdate(action="end"))["success"]  # nothing held: nothing to do
    assert group.update.run(call)["success"] and group.paused
    assert "action must be 'apply' or 'end'" in group.update.finish(FinishWeightUpdate(action="commit"))["message"]
    assert group.update.finish(FinishWeightUpdate(action="apply"))["success"] and group.paused
    assert group.update.finish(FinishWeightUpdate(action="end"))["success"] and not group.paused
    assert group.phases == ["check", "apply", "drop"] and group.cache_drops == 0  # flush_cache=False
    one = FakeGroup(check_error="ValueError: no weight named 'x'")  # one DP group: check and load in one call
    assert one.update.run(msgspec.structs.replace(call, phase="both")) == {
        "success": False, "message": "Failed to update weights: ValueError: no weight named 'x'. The old weights "
                                     "are still served."}
    assert not one.paused and one.phases == ["both"]
