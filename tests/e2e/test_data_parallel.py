"""Data parallelism on the CPU: two scheduler-worker groups behind one tokenizer (issue 8 acceptance).

One dp_size=2 engine serves the module; the last test kills one group's worker, so it runs last.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from treadle import Engine, EngineDeadError

from e2e_helpers import alive

pytestmark = pytest.mark.e2e

GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
PROMPTS = [f"Request {i}: " + "word " * (i % 13) for i in range(64)]


@pytest.fixture(scope="module")
def dp2():
    eng = Engine(model_path="default", dp_size=2, random_seed=0)
    yield eng
    eng.shutdown()


def _served(eng: Engine) -> list[int]:
    return [g["served"] for g in eng.get_server_info()["dp_groups"]]


def test_64_requests_spread_over_both_groups_match_dp1(engine, dp2):
    assert {"scheduler", "worker0", "dp1_scheduler", "dp1_worker0"} <= set(dp2._sup.procs)
    want = [r["output_ids"] for r in engine.generate(prompt=PROMPTS, sampling_params=GREEDY)]
    before = _served(dp2)
    got = dp2.generate(prompt=PROMPTS, sampling_params=GREEDY)
    assert [r["output_ids"] for r in got] == want
    served = [a - b for a, b in zip(_served(dp2), before)]
    assert sum(served) == 64 and min(served) >= 16, served  # least loaded first: 32 each here
    info = dp2.get_server_info()
    assert info["dp_size"] == 2 and [s["dp_rank"] for s in info["internal_states"]] == [0, 1]
    assert all(s["prompt_tokens"] > 0 and s["num_running"] == 0 for s in info["internal_states"])
    assert [g["in_flight"] for g in info["dp_groups"]] == [0, 0] and all(g["alive"] for g in info["dp_groups"])


def test_routed_dp_rank_pins_requests(dp2):
    """routed_dp_rank runs every request of the call on that group; out of range is a ValueError."""
    before = _served(dp2)
    dp2.generate(prompt=PROMPTS[:8], sampling_params=GREEDY, routed_dp_rank=1)
    assert [a - b for a, b in zip(_served(dp2), before)] == [0, 8]
    with pytest.warns(DeprecationWarning, match="routed_dp_rank"):
        dp2.generate(prompt="Hi", sampling_params=GREEDY, data_parallel_rank=0)
    with pytest.raises(ValueError, match=r"routed_dp_rank=2 out of range \[0, 2\)"):
        dp2.generate(prompt="Hi", sampling_params=GREEDY, routed_dp_rank=2)


def test_control_calls_reach_every_group_and_sessions_stick(dp2):
    assert dp2.flush_cache()
    sids = [dp2.open_session(1000) for _ in range(2)]
    assert sorted(dp2._sessions.groups[s] for s in sids) == [0, 1]  # one session per group
    assert dp2.open_session(1000, session_id=sids[1]) is None  # duplicate
    for sid in sids:
        m1 = dp2.generate(prompt="My name is Ada.", sampling_params=GREEDY, session_params={"id": sid})["meta_info"]
        m2 = dp2.generate(prompt=" What is my name?", sampling_params=GREEDY, session_params={"id": sid})["meta_info"]
        # the second turn ran in the first one's group: it found that turn's tokens cached there
        assert m2["cached_tokens"] >= m1["prompt_tokens"] + m1["completion_tokens"] - 1
    assert [s["num_sessions"] for s in dp2.get_server_info()["internal_states"]] == [1, 1]
    for sid in sids:
        dp2.close_session(sid)
    assert [s["num_sessions"] for s in dp2.get_server_info()["internal_states"]] == [0, 0]
    with pytest.raises(ValueError, match="does not exist"):
        dp2.generate(prompt="Hi", session_params={"id": sids[0]})
    # a session its scheduler closed on timeout no longer counts against its group
    timed = dp2.open_session(1000, timeout=0.5)
    assert dp2._sessions.groups[timed] == 0
    deadline = time.monotonic() + 10
    while sum(s["num_sessions"] for s in dp2.get_server_info()["internal_states"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    fresh = dp2.open_session(1000)
    assert dp2._sessions.groups[fresh] == 0 and timed not in dp2._sessions.groups
    dp2.close_session(fresh)


def test_a_weight_update_reaches_both_groups_or_neither(dp2, default_model_dir, monkeypatch):
    """An update that one group refuses changes neither group; one whose load fails on a group
    after both checks passed says how the groups differ; ``weight_version`` stays one value."""
    from safetensors import safe_open

    from treadle.runtime.messages import (
        FinishWeightUpdate, ReleaseMemoryOccupation, ResumeMemoryOccupation, UpdateWeightsFromTensor,
    )

    def served() -> list[tuple[list[list[int]], set[str]]]:  # per group: greedy tokens, weight_versions
        with ThreadPoolExecutor(2) as pool:
            out = pool.map(lambda g: dp2.generate(prompt=PROMPTS[:1], sampling_params=GREEDY, routed_dp_rank=g), [0, 1])
            return [([r["output_ids"] for r in res], {r["meta_info"]["weight_version"] for r in res}) for res in out]

    old, version = served(), dp2.get_server_info()["weight_version"]
    assert old[0] == old[1] and old[0][1] == {version}
    with safe_open(os.path.join(default_model_dir, "model.safetensors"), "pt") as f:  # a trainer's bucket
        names = [n for n in f.keys() if n.endswith("mlp.down_proj.weight")]
        base = [(n, f.get_tensor(n)) for n in names]
    gen = torch.Generator().manual_seed(0)
    bucket = [(n, t * (1 + 0.2 * torch.randn(t.shape, generator=gen))) for n, t in base]

    control = dp2._control_calls
    control.each(ReleaseMemoryOccupation(tags=["weights"]), [1])  # group 1 alone has its weights set aside
    ok, message, _ = dp2.update_weights_from_disk(default_model_dir)  # group 0's check passes
    control.each(ResumeMemoryOccupation(tags=["weights"]), [1])
    assert not ok and message.startswith("DP group 1: The weights are released") and "DP group 0" not in message
    assert f"No DP group changed its weights: every group serves the old ones and weight_version stays " \
           f"{version!r}" in message
    ok, message = dp2.update_weights_from_tensor([("model.layers.0.mlp.up_proj.weight", torch.zeros(3, 3))])
    assert not ok and "DP group 0: Failed" in message and "DP group 1: Failed" in message and "size" in message
    assert served() == old and dp2.get_server_info()["weight_version"] == version

    # both checks pass, then group 1's load fails: the tensors' segment is gone when it reads them again
    real_each, segment = control.each, []

    def each(call, groups=None, on_answer=None, settle=False):
        if isinstance(call, UpdateWeightsFromTensor):
            segment.append(f"/dev/shm/{call.shm_name}")
        if isinstance(call, FinishWeightUpdate) and call.action == "apply":
            first = real_each(call, [0], settle=settle)
            os.rename(segment[0], segment[0] + ".away")
            try:
                return {**first, **real_each(call, [1], settle=settle)}
            finally:
                os.rename(segment[0] + ".away", segment[0])
        return real_each(call, groups, on_answer, settle)

    monkeypatch.setattr(control, "each", each)
    ok, message = dp2.update_weights_from_tensor(bucket)
    monkeypatch.undo()
    assert not ok and message.startswith("DP group 1: Failed to load the new weights after they passed their check: ")
    assert "No such file" in message, message
    assert f"The DP groups now differ: group 0 serves the new weights; group 1 may serve a mix of old and new " \
           f"weights (its load stopped partway). weight_version stays {version!r}" in message
    split = served()
    assert split[0][0] != old[0][0] and split[1][0] == old[0][0] and split[0][1] == split[1][1] == {version}
    ok, message = dp2.update_weights_from_tensor(bucket)  # the retry brings both groups to the new weights
    assert ok, message
    assert served() == [(split[0][0], {"1"})] * 2 and dp2.get_server_info()["weight_version"] == "1"
    ok, message, _ = dp2.update_weights_from_disk(default_model_dir, weight_version=version)
    assert ok and served() == old, message


def test_killing_a_group_worker_fails_its_requests_and_the_rest_serves(dp2):
    long = {"max_new_tokens": 3000, "ignore_eos": True}
    with ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(dp2.generate, prompt=f"Tell me a long story number {i}", sampling_params=long)
                for i in range(4)]
        deadline = time.monotonic() + 20
        while [g["in_flight"] for g in dp2.get_server_info()["dp_groups"]] != [2, 2]:
            assert time.monotonic() < deadline, dp2.get_server_info()["dp_groups"]
            time.sleep(0.2)
        killed_at = time.monotonic()
        os.kill(dp2._sup.procs["dp1_worker0"].pid, signal.SIGKILL)
        while sum(f.done() for f in futs) < 2:
            assert time.monotonic() - killed_at < 5, "the dead group's requests hung"
            time.sleep(0.05)
        failed = [f for f in futs if f.done()]
        for f in failed:
            err = f.exception()
            assert isinstance(err, EngineDeadError) and "dp1_worker0" in str(err) and "DP group 1" in str(err), err
        # group 0's requests are untouched: they still run and end normally when aborted
        dp2.abort_request(abort_all=True)
        survivors = [f.result(timeout=10) for f in futs if f not in failed]
    assert len(survivors) == 2 and all(r["meta_info"]["finish_reason"]["type"] == "abort" for r in survivors)

    info = dp2.get_server_info()  # the engine reports the dead group and serves on the other
    assert [g["alive"] for g in info["dp_groups"]] == [True, False]
    assert "dp1_worker0" in info["dp_groups"][1]["error"]
    assert [s["dp_rank"] for s in info["internal_states"]] == [0]
    assert not alive(dp2._sup.procs["dp1_scheduler"].pid)  # the rest of the group was stopped
    before = _served(dp2)
    res = dp2.generate(prompt=PROMPTS[:8], sampling_params=GREEDY)
    assert all(r["meta_info"]["completion_tokens"] == 6 for r in res)
    assert [a - b for a, b in zip(_served(dp2), before)] == [8, 0]

    pids, ipc = dp2.get_all_child_pids(), dp2._ipc.path
    dp2.shutdown()
    time.sleep(0.2)
    assert not any(alive(p) for p in pids) and not os.path.exists(ipc)
    with pytest.raises(EngineDeadError):
        dp2.generate(prompt="Hi")
