"""The client's control plumbing and session placement, against a fake I/O thread and socket."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import threading

import pytest

from treadle.client.calls import Calls, checked_payload
import treadle.client.control as control_module
from treadle.client.control import Control, ControlTimeoutError
from treadle.client.sessions import Sessions
from treadle.runtime.errors import EngineDeadError
from treadle.runtime.messages import (
    CloseSession, FinishWeightUpdate, FlushCache, GenerateBatch, GenerateReq, GetInternalState, GetLoad, ListSessions,
    OpenSession, StopProfile,
)
from treadle.runtime.profile_args import check_profile_args
from treadle.runtime.sampling_params import SamplingParams
from treadle.runtime.server_args import ServerArgs


class FakeSocket:
    def __init__(self):
        self.sent = []

    def send(self, msg):
        self.sent.append(msg)


class FakeSupervisor:
    """Answers each control call at once with ``answer(call, group)``."""

    def __init__(self, groups, answer):
        self.groups, self.answer, self.dead, self.ready_info = groups, answer, None, {}

    def live_groups(self):
        return list(self.groups)

    def add_control(self, call_id, dp_rank):
        fut = concurrent.futures.Future()
        self.pending = (fut, dp_rank)
        return fut


def control_with(groups, answer, **server_args):
    """A ``Control`` whose calls are answered as soon as they are sent."""
    socket, sup = FakeSocket(), FakeSupervisor(groups, answer)
    calls = Calls(socket, sup, ServerArgs(device="cpu", **server_args).resolved())

    def send(msg):
        socket.sent.append(msg)
        fut, g = sup.pending
        fut.set_result(answer(msg, g))

    socket.send = send
    return Control(calls, sup), socket


def test_each_sends_one_call_per_group_with_its_own_id():
    ctl, socket = control_with([0, 1], lambda c, g: {"group": g, "session": c.session_id})
    assert ctl.each(CloseSession(session_id="s")) == {0: {"group": 0, "session": "s"}, 1: {"group": 1, "session": "s"}}
    assert all(isinstance(m, CloseSession) and m.session_id == "s" for m in socket.sent)
    assert [m.dp_rank for m in socket.sent] == [0, 1] and len({m.call_id for m in socket.sent}) == 2
    ctl, socket = control_with([0, 1], lambda c, g: {"group": g})
    assert ctl.each(GetLoad(), [-1]) == {-1: {"group": -1}}  # the tokenizer
    assert ctl.first(GetInternalState()) == {"group": 0}


def test_flush_cache_and_profile_arguments():
    ctl, socket = control_with([0, 1], lambda c, g: {"success": g == 0})
    res = ctl.flush_cache()
    assert not res and res.message == "Cache not flushed because there is pending work."
    n = len(socket.sent)
    with pytest.raises(TypeError, match="start_profile\\(\\) got unexpected keyword argument\\(s\\): bogus"):
        ctl.start_profile({"bogus": 1})
    with pytest.raises(ValueError, match="num_steps must be a positive int"):
        check_profile_args({"num_steps": 0})
    assert len(socket.sent) == n  # refused before anything was sent


def test_a_call_that_times_out_names_the_call_and_the_process(monkeypatch):
    """No answer within CONTROL_TIMEOUT_S: a TimeoutError that says which call and which process,
    not a bare one; one deadline for the whole call, however many groups it went to."""
    monkeypatch.setattr(control_module, "CONTROL_TIMEOUT_S", 0.2)
    ctl, _ = control_with([0, 1], None)

    def send(msg):  # only group 0 answers
        fut, g = ctl.sup.pending
        if g == 0:
            fut.set_result({"success": True})

    ctl.calls.socket.send = send
    with pytest.raises(ControlTimeoutError) as err:
        ctl.flush_cache()
    assert isinstance(err.value, TimeoutError)
    assert str(err.value) == ("flush_cache: no answer from the dp1_scheduler process (DP group 1) within 0.2 s; "
                              "the processes are alive (their heartbeats go on), so it is busy or stuck")
    with pytest.raises(TimeoutError, match="^get_load: no answer from the tokenizer process within 0.2 s"):
        ctl.each(GetLoad(), [-1])
    ctl.calls.socket.send = lambda msg: None
    with pytest.raises(TimeoutError, match="^start_profile: no answer from the scheduler process \\(DP group 0\\) or "
                                           "the worker processes it waits on"):
        ctl.start_profile({})


def test_stop_profile_waits_as_long_as_the_export_takes(monkeypatch):
    """stop_profile returns when the workers answer (the trace is written), with no deadline; a
    process that dies meanwhile fails it with EngineDeadError (the supervisor sets it on the future)."""
    monkeypatch.setattr(control_module, "CONTROL_TIMEOUT_S", 0.05)
    ctl, socket = control_with([0], None)
    sent = []

    def send(msg):
        sent.append(msg)
        fut, _ = ctl.sup.pending
        threading.Timer(0.5, fut.set_result, [{"trace": "/tmp/t.trace.json.gz"}]).start()  # 10x the timeout

    ctl.calls.socket.send = send
    ctl.stop_profile()
    assert isinstance(sent[0], StopProfile)

    def die(msg):
        fut, _ = ctl.sup.pending
        threading.Timer(0.2, fut.set_exception, [EngineDeadError("The worker0 process exited unexpectedly")]).start()

    ctl.calls.socket.send = die
    with pytest.raises(EngineDeadError, match="worker0"):
        ctl.stop_profile()
    assert control_module.call_name(FlushCache()) == "flush_cache"


def test_liveness():
    ctl, _ = control_with([0], lambda c, g: None)
    ctl.calls.closed = True
    with pytest.raises(EngineDeadError, match="shut down"):
        ctl.each(GetInternalState())
    worker_node, _ = control_with([0], lambda c, g: None, tp_size=2, nnodes=2, node_rank=1,
                                  dist_init_addr="127.0.0.1:5000")
    with pytest.raises(RuntimeError, match="node_rank=1 of nnodes=2"):
        worker_node.calls.check_alive()


def test_sessions_go_to_the_group_holding_fewest():
    opened = {}

    def answer(call, g):
        if isinstance(call, OpenSession):
            return opened.setdefault(call.session_id, g) == g and call.session_id != "taken"
        if isinstance(call, ListSessions):
            return sorted(s for s, h in opened.items() if h == g)
        if isinstance(call, CloseSession):
            opened.pop(call.session_id, None)

    ctl, _ = control_with([0, 1], answer)
    sessions = Sessions(streaming_enabled=False)
    assert [sessions.open(ctl, 0, sid, False, None) for sid in ("a", "b", "c")] == ["a", "b", "c"]
    assert sessions.groups == {"a": 0, "b": 1, "c": 0}
    assert sessions.open(ctl, 0, "taken", False, None) is None and "taken" not in sessions.groups
    sessions.open(ctl, 0, "t", False, 5.0)
    assert sessions.timed == {"t"} and sessions.group_of("t") == 1
    del opened["t"]  # its scheduler closed it on timeout
    sessions.open(ctl, 0, "d", False, None)  # placing a session first forgets those closed on timeout
    assert "t" not in sessions.groups and not sessions.timed
    sessions.close(ctl, "a")
    assert "a" not in opened and "a" not in sessions.groups
    with pytest.raises(ValueError, match="Streaming sessions are disabled"):
        sessions.open(ctl, 0, None, True, None)
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        sessions.open(ctl, 0, None, False, True)


def test_a_refused_weight_update_leaves_the_weight_version(default_model_dir):
    """Only an update the workers took moves ``weight_version``: a refused one (a bad name, shape
    or checkpoint) neither changes it nor uses up a number. Two DP groups: one number per update."""
    import torch

    from treadle.client.weights import WeightUpdates

    took = {"ok": True}  # each group's check passes; the load and the end of an update always do
    ctl, socket = control_with([0, 1], lambda c, g: {"success": took["ok"] or isinstance(c, FinishWeightUpdate),
                                                     "message": "ok" if took["ok"] else "bad"})
    args = ServerArgs(device="cpu")
    weights = WeightUpdates(ctl, args)
    norm = [("model.norm.weight", torch.ones(4))]
    assert weights.from_tensors(norm, None, True) == (True, "ok") and args.weight_version == "1"
    took["ok"] = False
    for ok, message, *_ in (weights.from_tensors(norm, None, True),
                            weights.from_distributed(["model.norm.weight"], ["float32"], [[4]], "g", True, None),
                            weights.from_disk(default_model_dir, None, "never")):
        assert not ok and message.startswith("DP group 0: bad DP group 1: bad No DP group changed"), message
    assert args.weight_version == "1"
    took["ok"] = True
    assert weights.from_distributed(["model.norm.weight"], ["float32"], [[4]], "g", True, None) == (True, "ok")
    assert args.weight_version == "2"
    assert weights.from_disk(default_model_dir, None, "step3")[0] and args.weight_version == "step3"
    assert weights.from_tensors(norm, None, True)[0] and args.weight_version == "4"
    # to each group: a taken update is check, apply, end; a refused one check, end
    assert len(socket.sent) == 2 * (4 * 3 + 3 * 2)


def test_checked_payload_names_the_field():
    req = GenerateReq(rid="r", text="a", sampling=SamplingParams(), return_logprob="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Invalid request: Expected `bool`, got `str` - at `return_logprob`"):
        checked_payload(GenerateBatch(call_id=1, reqs=[req]))


def test_client_does_not_import_torch():
    code = "import sys; from treadle import Engine; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
