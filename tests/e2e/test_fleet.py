"""``treadle fleet`` on CPU, issue 23's acceptance 1-4, on ONE fleet shared by the module (its
start is the costly part): two workers on the default model, plus a third whose model path does
not exist, which crash-loops in the background while the others serve (acceptance 3). The tests
run in file order; the last one stops the fleet.

1. 100 concurrent requests all complete; unrelated ones spread 30-70% over the two workers;
   ten sharing a 400-token prefix all go to one worker, whose ``cached_tokens`` show the reuse;
   a session's turns stay on its worker; OpenAI's client (chat, streamed) and ``RemoteEngine``
   pointed at the router work.
2. SIGKILL of a worker during 100 requests: every whole answer and every stream not yet started
   completes (retried on the other worker); a started stream either completes or ends with the
   router's error event; the worker is restarted (one restart in ``fleet status``). SIGSTOP of a
   worker: unhealthy within the probe period, no new requests, restarted.
3. The bad worker stays down after the crash-loop limit, its error in ``fleet status``.
4. ``fleet down`` with streams in flight: they finish, the supervisor exits 0, no process is left.
   (SIGTERM to the supervisor, which ``fleet down`` sends, is also the Ray module's last test.)
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.e2e.fleet_helpers import (API_KEY, AUTH, ROOT, WORDS, Outcome, client_for, no_process_left, run_load,
                                    running_fleet, send, unrelated, write_spec)
from treadle.client.remote import RemoteEngine

pytestmark = pytest.mark.e2e

WORKERS = """
[[workers]]
name = "w0"
[[workers]]
name = "w1"
[[workers]]
name = "bad"
engine = { model_path = "/nonexistent/fleet-test-model" }
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    d = tmp_path_factory.mktemp("fleet")
    port = write_spec(str(d / "fleet.toml"), WORKERS)
    with running_fleet(str(d / "fleet.toml"), port, "w0 and w1 healthy",
                       lambda f: f.worker("w0").get("state") == f.worker("w1").get("state") == "healthy", 240) as f:
        yield f


def test_workers_get_the_key_through_their_environment(fleet):
    """The fleet's key is not on a worker's command line (any user of the host reads those) nor in
    the server info (router or worker), yet a worker reached directly refuses a request without it."""
    for name in ("w0", "w1"):
        w = fleet.worker(name)
        with open(f"/proc/{w['pid']}/cmdline", "rb") as f:
            assert API_KEY.encode() not in f.read(), name
        assert httpx.get(f"{w['url']}/get_model_info", timeout=30).status_code == 401, name
        assert httpx.get(f"{w['url']}/get_model_info", headers=AUTH, timeout=30).status_code == 200, name
    for url in (fleet.url, fleet.worker("w0")["url"]):  # the server args never carry it (runtime/redact.py)
        r = httpx.get(f"{url}/get_server_info", headers=AUTH, timeout=60)
        assert r.status_code == 200 and r.json()["api_key"] == "***" and API_KEY not in r.text, url


def test_load_spread_and_shared_prefix(fleet):
    outs = run_load(fleet.url, unrelated(100, seed=1), max_new_tokens=4)
    assert all(o.status == 200 and o.body["meta_info"]["completion_tokens"] == 4 for o in outs), \
        [o.body for o in outs if o.status != 200][:3]
    share = sum(o.worker == "w0" for o in outs) / len(outs)
    assert 0.3 <= share <= 0.7 and {o.worker for o in outs} == {"w0", "w1"}, share

    prefix = " ".join(f"Rule {i}: keep the {WORDS[i % len(WORDS)]} near the {WORDS[(3 * i) % len(WORDS)]}."
                      for i in range(40))
    first = run_load(fleet.url, [prefix + " Question zero?"], max_new_tokens=4)[0]
    assert first.body["meta_info"]["prompt_tokens"] >= 400
    rest = run_load(fleet.url, [prefix + f" Question {w}?" for w in WORDS[:9]], max_new_tokens=4)
    assert {o.worker for o in rest} == {first.worker}
    assert all(o.body["meta_info"]["cached_tokens"] >= 380 for o in rest), [o.body["meta_info"] for o in rest]

    with httpx.Client(base_url=fleet.url, headers=AUTH, timeout=300) as c:  # a session stays on its worker
        sid = c.post("/open_session", json={"capacity_of_str_len": 4000}).json()
        turns = [c.post("/generate", json={"text": text, "sampling_params": {"max_new_tokens": 4},
                                           "session_params": {"id": sid}}) for text in unrelated(3, seed=6)]
        assert len({r.headers["x-treadle-worker"] for r in turns}) == 1 and all(r.status_code == 200 for r in turns)
        lengths = [r.json()["meta_info"]["prompt_tokens"] for r in turns]
        assert lengths[0] < lengths[1] < lengths[2]  # each turn continues the last
        assert c.post("/open_session", json={"capacity_of_str_len": 10, "session_id": sid}).status_code == 400
        assert c.post("/close_session", json={"session_id": sid}).status_code == 200

    chat = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key=API_KEY).chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Say hi"}], max_tokens=4, stream=True)
    assert sum(len(ch.choices[0].delta.content or "") for ch in chat if ch.choices) > 0

    engine = RemoteEngine(fleet.url, api_key=API_KEY)
    try:
        out = engine.generate("The capital of France is", {"max_new_tokens": 4, "temperature": 0.0})
        assert out["meta_info"]["completion_tokens"] == 4
        chunks = list(engine.generate("The capital of France is", {"max_new_tokens": 4, "temperature": 0.0},
                                      stream=True))
        assert "".join(c["text"] for c in chunks) == out["text"]
    finally:
        engine.shutdown()


def test_sigkill_and_sigstop(fleet):
    victim = fleet.worker("w0")

    async def load():
        async with client_for(fleet.url) as c:
            outs = [Outcome() for _ in range(100)]
            tasks = [asyncio.create_task(send(c, t, 8, stream=i % 2 == 0, out=outs[i]))
                     for i, t in enumerate(unrelated(100, seed=2))]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # kill w0 as soon as one of its streams has begun
                await asyncio.sleep(0.01)
                if any(o.worker == "w0" and o.first_event is not None for o in outs):
                    break
            os.kill(victim["pid"], signal.SIGKILL)
            return await asyncio.gather(*tasks)

    outs = asyncio.run(load())
    whole = [o for o in outs if not o.events and o.body is not None]
    streams = [o for o in outs if o.body is None]
    assert len(whole) == 50 and len(streams) == 50
    assert all(o.status == 200 and o.body["meta_info"]["completion_tokens"] == 8 for o in whole), \
        [(o.status, o.body) for o in whole if o.status != 200][:3]
    for o in streams:
        assert o.status == 200 and o.done
        if o.error is None:
            assert o.events[-1]["meta_info"]["finish_reason"]["type"] == "length"
        else:  # cut by the kill: only after its first event, and said clearly
            assert o.worker == "w0" and o.error["code"] == "worker_failed" and len(o.events) >= 2, o.events
    assert any(o.worker == "w1" for o in outs)
    cut = [o for o in streams if o.error is not None]
    metrics = httpx.get(f"{fleet.url}/metrics", headers=AUTH).text
    retried = sum(float(ln.split()[-1]) for ln in metrics.splitlines()
                  if ln.startswith('treadle_router:retries_total{worker="w0"}'))
    print(f"SIGKILL under load: {len(cut)} stream(s) cut with the error event, {retried:g} request(s) retried")
    assert cut and retried >= 1  # both paths ran: begun streams cut, the others retried on w1
    took = fleet.wait_for("w0 restarted", lambda: fleet.worker("w0").get("restarts") == 1
                          and fleet.worker("w0").get("pid") != victim["pid"], 30)
    print(f"w0's restart began {took:.1f} s after the kill")
    fleet.wait_for("w0 healthy again", lambda: fleet.worker("w0").get("state") == "healthy", 180)
    out = subprocess.run([sys.executable, "-m", "treadle", "fleet", "status", fleet.spec_path], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    row = next(ln.split() for ln in out.stdout.splitlines() if ln.startswith("w0 "))
    assert out.returncode == 0 and row[4:6] == ["healthy", "1"], out.stdout

    frozen = fleet.worker("w1")
    os.kill(frozen["pid"], signal.SIGSTOP)
    try:
        took = fleet.wait_for("w1 unhealthy", lambda: fleet.worker("w1").get("state") != "healthy", 20)
        print(f"w1 marked unhealthy {took:.1f} s after SIGSTOP")
        outs = run_load(fleet.url, unrelated(10, seed=3), max_new_tokens=2)
        assert [o.worker for o in outs] == ["w0"] * 10 and all(o.status == 200 for o in outs)
        fleet.wait_for("w1 restarted", lambda: fleet.worker("w1").get("restarts") == 1
                       and fleet.worker("w1").get("pid") != frozen["pid"], 30)
    finally:
        try:
            os.kill(frozen["pid"], signal.SIGCONT)
        except ProcessLookupError:
            pass


def test_crash_loop_stays_down(fleet):
    fleet.wait_for("bad worker failed", lambda: fleet.worker("bad").get("state") == "failed", 90)
    bad = fleet.worker("bad")
    assert bad["restarts"] == 2 and "crash loop: 3 crashes" in bad["error"]
    assert "fleet-test-model" in bad["error"], bad["error"]  # treadle serve's own reason, from its log
    out = subprocess.run([sys.executable, "-m", "treadle.deploy", "status", fleet.spec_path], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert "bad: crash loop" in out.stdout and "failed" in out.stdout
    assert all(o.status == 200 for o in run_load(fleet.url, unrelated(4, seed=4), max_new_tokens=2))


def test_fleet_down_drains_and_leaves_nothing(fleet):
    """w1 may still be starting after its restart: stopping it mid-start must leave nothing either."""
    async def load_then_down():
        async with client_for(fleet.url) as c:
            outs = [Outcome() for _ in range(10)]
            tasks = [asyncio.create_task(send(c, t, 8, stream=True, out=o)) for t, o in zip(unrelated(10, seed=5), outs)]
            while not all(o.worker for o in outs):  # all in flight (their answers have begun)
                await asyncio.sleep(0.05)
            pids = fleet.tree()
            down = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "treadle", "fleet", "down", fleet.spec_path, cwd=ROOT,
                env={**os.environ, "PYTHONPATH": ROOT})
            return pids, await asyncio.gather(*tasks), await down.wait()

    pids, outs, down_rc = asyncio.run(load_then_down())
    assert down_rc == 0
    assert all(o.status == 200 and o.done and o.error is None and len(o.events) >= 1
               and o.events[-1]["meta_info"]["finish_reason"]["type"] == "length" for o in outs), \
        [o.events[-1:] for o in outs]
    assert fleet.proc.wait(timeout=60) == 0
    assert no_process_left(pids) == [], pids
    assert fleet.status()["phase"] == "stopped"
