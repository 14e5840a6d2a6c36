"""Child death, shutdown hygiene, two engines side by side, concurrency (issue acceptance 4 and 5).

A child killed (SIGKILL) or frozen (SIGSTOP) under load, each of the four in turn, is
tests/e2e/test_chaos.py's: its rounds check what a kill test here would (pending calls fail fast
with EngineDeadError naming the child, new calls fail at once, nothing left after shutdown)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from treadle import CustomLogitProcessor, Engine, EngineDeadError

from e2e_helpers import alive

pytestmark = pytest.mark.e2e


def test_64_concurrent_requests_of_mixed_lengths(engine):
    """Requests join and leave the running batch: short ones finish while long ones keep decoding."""
    import asyncio

    async def run():
        tasks = [engine.async_generate(prompt=f"Request {i}: " + "word " * (i % 13),
                                       sampling_params={"temperature": 0, "max_new_tokens": 4 + (i * 7) % 40,
                                                        "ignore_eos": True})
                 for i in range(64)]
        return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    assert len(results) == 64
    for i, r in enumerate(results):
        assert r["meta_info"]["completion_tokens"] == 4 + (i * 7) % 40
        assert r["meta_info"]["finish_reason"] == {"type": "length", "length": 4 + (i * 7) % 40}
    # the same greedy request gives the same tokens alone as inside the crowd
    alone = engine.generate(prompt="Request 5: " + "word " * 5,
                            sampling_params={"temperature": 0, "max_new_tokens": 39, "ignore_eos": True})
    assert alone["output_ids"] == results[5]["output_ids"]
    state = engine.get_server_info()["internal_states"][0]
    assert state["free_pages"] + state["cached_pages"] == state["num_pages"] and state["num_running"] == 0


def test_abort_request(engine):
    import asyncio

    async def run():
        task = asyncio.ensure_future(engine.async_generate(
            prompt="Count forever", rid="abort-me", sampling_params={"max_new_tokens": 3000, "ignore_eos": True}))
        await asyncio.sleep(1.0)
        engine.abort_request("abort-me")
        return await asyncio.wait_for(task, 10)

    res = asyncio.run(run())
    assert res["meta_info"]["finish_reason"]["type"] == "abort"
    assert res["meta_info"]["completion_tokens"] < 3000


class Stall(CustomLogitProcessor):
    """Holds the worker inside a step for ``custom_params["seconds"]``: a stuck worker."""

    def __call__(self, logits, custom_param_list):
        time.sleep(custom_param_list[0]["seconds"])
        return logits


def test_watchdog_fails_calls_when_a_step_hangs():
    eng = Engine(model_path="default", watchdog_timeout=2, enable_custom_logit_processor=True)
    try:
        t0 = time.monotonic()
        with pytest.raises(EngineDeadError, match="watchdog_timeout=2"):
            eng.generate(prompt="Hi", custom_logit_processor=Stall, sampling_params={
                "max_new_tokens": 4, "custom_params": {"seconds": 60}})
        assert time.monotonic() - t0 < 10  # the 2 s watchdog, not the 60 s stall
    finally:
        pids = eng.get_all_child_pids()
        eng.shutdown()
    assert not any(alive(p) for p in pids)  # the stuck worker too


def test_a_long_step_is_not_a_frozen_process_and_two_engines_shut_down_cleanly(engine, monkeypatch):
    """Liveness does not depend on how long a step takes: a 6 s step under a 2 s heartbeat timeout
    finishes, because the beats come from their own thread. (The timeout must exceed the 1 s beat
    interval, or one beat's jitter reads as silence.) The same engine runs beside the session's:
    its own socket directory, the same greedy tokens; its shutdown (twice: idempotent) leaves no
    process and no directory behind, and the other engine serves on."""
    monkeypatch.setenv("TREADLE_HEARTBEAT_TIMEOUT_S", "2")
    a, b = Engine(model_path="default", random_seed=1, enable_custom_logit_processor=True), engine
    try:
        out = a.generate(prompt="Hi", custom_logit_processor=Stall, sampling_params={
            "max_new_tokens": 1, "custom_params": {"seconds": 6}})
        assert out["meta_info"]["completion_tokens"] == 1
        assert a._ipc.path != b._ipc.path
        params = {"temperature": 0, "max_new_tokens": 8}
        ra = a.generate(prompt="The capital of France is", sampling_params=params)
        rb = b.generate(prompt="The capital of France is", sampling_params=params)
        assert ra["output_ids"] == rb["output_ids"]
    finally:
        pids, path = a.get_all_child_pids(), a._ipc.path
        a.shutdown()
        a.shutdown()  # idempotent
    time.sleep(0.2)
    assert not any(alive(p) for p in pids)
    assert not os.path.exists(path)
    with pytest.raises(EngineDeadError):
        a.generate(prompt="Hi")
    assert b.generate(prompt="Hi", sampling_params={"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_the_socket_directory_goes_with_a_killed_user_process(sig):
    """The user's process dies without shutdown(): its children exit, and the private socket
    directory (sockets and spec files) is removed by the last process out, not left in /tmp."""
    import json
    import subprocess
    import sys

    script = ("import json, time\nfrom treadle import Engine\ne = Engine(model_path='default')\n"
              "print(json.dumps({'dir': e._ipc.path, 'pids': e.get_all_child_pids()}), flush=True)\ntime.sleep(600)\n")
    user = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(user.stdout.readline())
        assert os.path.isdir(info["dir"])
        user.send_signal(sig)
        user.wait(timeout=10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (os.path.exists(info["dir"]) or any(alive(p) for p in info["pids"])):
            time.sleep(0.05)
        assert not any(alive(p) for p in info["pids"]), "a child outlived the user's process"
        assert not os.path.exists(info["dir"]), "the socket directory was left behind"
    finally:
        user.kill()
        user.wait()
