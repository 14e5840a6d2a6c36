"""Child death, shutdown hygiene, two engines side by side, concurrency (issue acceptance 4 and 5)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from treadle import CustomLogitProcessor, Engine, EngineDeadError

from e2e_helpers import alive

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("victim", ["tokenizer", "scheduler", "worker0", "detokenizer"])
def test_killing_a_child_fails_pending_calls_fast(victim):
    eng = Engine(model_path="default")
    try:
        pid = eng._sup.procs[victim].pid
        errors: list[BaseException] = []
        started = threading.Event()

        def long_call():
            started.set()
            try:
                eng.generate(prompt="Tell me a very long story", sampling_params={"max_new_tokens": 4000, "ignore_eos": True})
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        t = threading.Thread(target=long_call)
        t.start()
        started.wait()
        time.sleep(1.0)  # let it get going
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        t.join(timeout=10)
        assert not t.is_alive(), "the pending call hung"
        assert time.monotonic() - killed_at < 5
        assert errors and isinstance(errors[0], EngineDeadError), errors
        assert victim in str(errors[0])
        t0 = time.monotonic()
        with pytest.raises(EngineDeadError):
            eng.generate(prompt="Hi", sampling_params={"max_new_tokens": 2})
        assert time.monotonic() - t0 < 0.5
    finally:
        pids = eng.get_all_child_pids()
        eng.shutdown()
    assert not any(alive(p) for p in pids)


def test_two_engines_side_by_side_and_shutdown_is_clean():
    a = Engine(model_path="default", random_seed=1)
    b = Engine(model_path="default", random_seed=2)
    try:
        assert a._ipc.path != b._ipc.path
        ra = a.generate(prompt="The capital of France is", sampling_params={"temperature": 0, "max_new_tokens": 8})
        rb = b.generate(prompt="The capital of France is", sampling_params={"temperature": 0, "max_new_tokens": 8})
        assert ra["output_ids"] == rb["output_ids"]
    finally:
        pids = a.get_all_child_pids() + b.get_all_child_pids()
        dirs = [a._ipc.path, b._ipc.path]
        a.shutdown()
        a.shutdown()  # idempotent
        b.shutdown()
    time.sleep(0.2)
    assert not any(alive(p) for p in pids)
    assert not any(os.path.exists(d) for d in dirs)
    with pytest.raises(EngineDeadError):
        a.generate(prompt="Hi")


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


@pytest.mark.parametrize("victim", ["tokenizer", "scheduler", "worker0", "detokenizer"])
def test_a_frozen_child_fails_pending_and_new_calls(victim, monkeypatch):
    """SIGSTOP: the process lives on but never answers. Its heartbeats stop, and within the
    heartbeat timeout (2 s here, 10 s by default) every pending call fails with EngineDeadError
    naming it, new calls fail at once, and shutdown leaves nothing behind."""
    monkeypatch.setenv("TREADLE_HEARTBEAT_TIMEOUT_S", "2")
    eng = Engine(model_path="default")
    try:
        assert eng.generate(prompt="Hi", sampling_params={"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2
        errors: list[BaseException] = []
        started = threading.Event()

        def long_call():
            started.set()
            try:
                eng.generate(prompt="Tell me a story", sampling_params={"max_new_tokens": 4000, "ignore_eos": True})
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        t = threading.Thread(target=long_call)
        t.start()
        started.wait()
        time.sleep(0.5)
        stopped_at = time.monotonic()
        os.kill(eng._sup.procs[victim].pid, signal.SIGSTOP)
        t.join(timeout=15)
        assert not t.is_alive(), "the pending call hung"
        assert time.monotonic() - stopped_at < 2 + 3  # the timeout, a beat's interval and a poll
        assert errors and isinstance(errors[0], EngineDeadError), errors
        assert victim in str(errors[0]) and "stopped responding" in str(errors[0])
        with pytest.raises(EngineDeadError, match=victim):
            eng.generate(prompt="Hi", sampling_params={"max_new_tokens": 2})
    finally:
        pids = eng.get_all_child_pids()
        eng.shutdown()
    assert not any(alive(p) for p in pids)


def test_a_long_step_is_not_a_frozen_process(monkeypatch):
    """Liveness does not depend on how long a step takes: a 6 s step under a 2 s heartbeat timeout
    finishes, because the beats come from their own thread. (The timeout must exceed the 1 s beat
    interval, or one beat's jitter reads as silence.)"""
    monkeypatch.setenv("TREADLE_HEARTBEAT_TIMEOUT_S", "2")
    with Engine(model_path="default", enable_custom_logit_processor=True) as eng:
        out = eng.generate(prompt="Hi", custom_logit_processor=Stall, sampling_params={
            "max_new_tokens": 1, "custom_params": {"seconds": 6}})
        assert out["meta_info"]["completion_tokens"] == 1


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
