"""Data parallelism on the CPU: two scheduler-worker groups behind one tokenizer (issue 8 acceptance).

One dp_size=2 engine serves the module; the last test kills one group's worker, so it runs last.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

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
