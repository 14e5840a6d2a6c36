"""The mixed load of the chaos test and the soak (``bench/soak.py``, ``tests/e2e/test_chaos.py``):
sync and async calls from several clients at once, each result checked for its shape, each
outcome recorded, until the engine dies or the load is stopped.

The calls cover what a user does: single prompts, batches, streams (read to the end, or closed
half-read, which aborts the rest), logprobs, aborts by rid (now and then ``abort_all``), and a
control call (``get_server_info``). A call may end with a result or ``EngineDeadError``;
anything else, a result of the wrong shape, or a call that never ends is what the chaos test
looks for.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from typing import Any, Optional

PROMPTS = ("The capital of France is", "Write a haiku about rain.", "List three prime numbers:",
           "Once upon a time", "Explain what a compiler does in one sentence.", "def fibonacci(n):")


class BadResult(Exception):
    """A call returned, but not a finished result of the shape its arguments ask for."""


# ---------------------------------------------------------------- the calls
def _sampling(rng: random.Random, longest: int) -> dict[str, Any]:
    return {"max_new_tokens": rng.randint(1, longest), "temperature": rng.choice([0.0, 0.8]),
            "ignore_eos": rng.random() < 0.5}


def _check(res: Any, logprobs: bool = False) -> None:
    finish = res["meta_info"]["finish_reason"]
    if not finish or finish.get("type") not in ("stop", "length", "abort"):
        raise BadResult(f"unfinished or odd finish_reason {finish!r}")
    meta = res["meta_info"]
    if logprobs and finish["type"] != "abort" and len(meta["output_token_logprobs"]) != meta["completion_tokens"]:
        raise BadResult(f"{len(meta['output_token_logprobs'])} output logprobs for {meta['completion_tokens']} tokens")


def _check_batch(res: Any, n: int, logprobs: bool = False) -> None:
    if len(res) != n:
        raise BadResult(f"{len(res)} results for a batch of {n}")
    for r in res:
        _check(r, logprobs)


def _check_stream(chunks: list[dict], n: int) -> None:
    last = {c.get("index", 0): c for c in chunks}
    if sorted(last) != list(range(n)):
        raise BadResult(f"stream chunks for items {sorted(last)} of {n}")
    for c in last.values():
        _check(c)


def _raise_worst(errors: list[BaseException]) -> None:
    """Raise the first error that is not ``EngineDeadError`` (a call and its abort both failing
    must not hide a wrong error type behind the expected one), else the first."""
    from treadle import EngineDeadError

    if errors:
        raise next((e for e in errors if not isinstance(e, EngineDeadError)), errors[0])


def _prompts(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(PROMPTS) for _ in range(n)]


SYNC_KINDS = ("one", "batch", "logprobs", "stream", "stream_batch", "stream_closed", "abort", "info")
ASYNC_KINDS = ("one", "batch", "logprobs", "stream", "stream_closed", "abort")


def sync_call(eng: Any, rng: random.Random, kind: str, longest: int) -> None:
    """One blocking call of ``kind`` (at most ``longest`` new tokens a prompt; four times that for
    the calls that get aborted or closed early), its result checked; raises what the call raised."""
    n, prompt = rng.randint(2, 4), rng.choice(PROMPTS)
    sp, long_sp = _sampling(rng, longest), _sampling(rng, 4 * longest)
    if kind == "one":
        _check(eng.generate(prompt=prompt, sampling_params=sp))
    elif kind == "batch":
        _check_batch(eng.generate(prompt=_prompts(rng, n), sampling_params=sp), n)
    elif kind == "logprobs":
        _check(eng.generate(prompt=prompt, sampling_params=sp, return_logprob=True, top_logprobs_num=2), logprobs=True)
    elif kind == "stream":
        _check_stream(list(eng.generate(prompt=prompt, sampling_params=sp, stream=True)), 1)
    elif kind == "stream_batch":
        _check_stream(list(eng.generate(prompt=_prompts(rng, n), sampling_params=sp, stream=True)), n)
    elif kind == "stream_closed":  # the caller stops reading: the rest is aborted
        chunks = eng.generate(prompt=prompt, sampling_params=long_sp, stream=True)
        next(chunks)
        chunks.close()
    elif kind == "abort":
        rid = f"chaos-{uuid.uuid4().hex}"
        errors: list[BaseException] = []

        def abort() -> None:
            try:
                eng.abort_request(rid, abort_all=rng.random() < 0.1)
            except BaseException as e:  # noqa: BLE001 - judged below, like the call's own outcome
                errors.append(e)

        timer = threading.Timer(rng.uniform(0.0, 0.5), abort)
        timer.start()
        try:
            _check(eng.generate(prompt=prompt, rid=rid, sampling_params=long_sp))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        timer.join()
        _raise_worst(errors)
    elif "internal_states" not in eng.get_server_info():
        raise BadResult("get_server_info() without internal_states")


async def async_call(eng: Any, rng: random.Random, kind: str, longest: int) -> None:
    """The async twin of ``sync_call``."""
    n, prompt = rng.randint(2, 4), rng.choice(PROMPTS)
    sp, long_sp = _sampling(rng, longest), _sampling(rng, 4 * longest)
    if kind == "one":
        _check(await eng.async_generate(prompt=prompt, sampling_params=sp))
    elif kind == "batch":
        _check_batch(await eng.async_generate(prompt=_prompts(rng, n), sampling_params=sp), n)
    elif kind == "logprobs":
        _check(await eng.async_generate(prompt=prompt, sampling_params=sp, return_logprob=True, top_logprobs_num=2),
               logprobs=True)
    elif kind == "stream":
        gen = await eng.async_generate(prompt=_prompts(rng, n), sampling_params=sp, stream=True)
        _check_stream([c async for c in gen], n)
    elif kind == "stream_closed":
        gen = await eng.async_generate(prompt=prompt, sampling_params=long_sp, stream=True)
        await gen.__anext__()
        await gen.aclose()
    else:
        rid = f"chaos-{uuid.uuid4().hex}"
        task = asyncio.ensure_future(eng.async_generate(prompt=prompt, rid=rid, sampling_params=long_sp))
        await asyncio.sleep(rng.uniform(0.0, 0.5))
        errors: list[BaseException] = []
        res = None
        for step in (eng.async_abort_request(rid), task):
            try:
                res = await step
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
        _raise_worst(errors)
        _check(res)


# ---------------------------------------------------------------- the load
class Load:
    """Mixed calls from ``n_sync`` threads and ``n_async`` tasks on one event loop thread, each
    client calling until the engine dies (its first ``EngineDeadError`` ends it) or ``stop()``."""

    def __init__(self, eng: Any, seed: int, longest: int = 24, n_sync: int = 3, n_async: int = 4) -> None:
        from treadle import EngineDeadError

        self.eng, self.seed, self.longest, self.dead_type = eng, seed, longest, EngineDeadError
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.ok: dict[str, int] = {}  # call kind -> calls that returned a good result
        self.dead = 0  # calls that raised EngineDeadError
        self.dead_messages: set[str] = set()
        self.other: list[str] = []  # any other exception, or a bad result: a bug
        self.current: dict[str, tuple[str, float]] = {}  # client -> (call kind, when it started)
        self.generated = threading.Event()  # set by the first generate call that returned its result
        self.threads = [threading.Thread(target=self._sync_client, args=(f"sync{i}",), daemon=True)
                        for i in range(n_sync)]
        self.threads.append(threading.Thread(target=lambda: asyncio.run(self._async_clients(n_async)), daemon=True))
        self.n_clients = n_sync + n_async  # each has at most one call open at a time

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stopping.set()

    def join(self, deadline: float) -> list[str]:
        """Wait until every client ended or ``deadline``; returns the calls still running then."""
        for t in self.threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        now = time.monotonic()
        with self.lock:
            return [f"{client}: {kind} for {now - t0:.1f} s" for client, (kind, t0) in self.current.items()]

    def _begin(self, client: str, kind: str) -> None:
        with self.lock:
            self.current[client] = (kind, time.monotonic())

    def _end(self, client: str, kind: str, error: Optional[BaseException]) -> bool:
        """Record one call's outcome; False when the client should stop (the engine is dead)."""
        with self.lock:
            self.current.pop(client, None)
            if error is None:
                self.ok[kind] = self.ok.get(kind, 0) + 1
                if kind != "info":
                    self.generated.set()
            elif isinstance(error, self.dead_type):
                self.dead += 1
                self.dead_messages.add(str(error))
                return False
            else:
                self.other.append(f"{client}: {kind}: {type(error).__name__}: {error}")
        return not self.stopping.is_set()

    def _sync_client(self, client: str) -> None:
        rng = random.Random(f"{self.seed}-{client}")
        while True:
            kind = rng.choice(SYNC_KINDS)
            self._begin(client, kind)
            try:
                sync_call(self.eng, random.Random(rng.random()), kind, self.longest)
                error = None
            except BaseException as e:  # noqa: BLE001 - every outcome is recorded and judged
                error = e
            if not self._end(client, kind, error):
                return

    async def _async_clients(self, n: int) -> None:
        async def client(name: str) -> None:
            rng = random.Random(f"{self.seed}-{name}")
            while True:
                kind = rng.choice(ASYNC_KINDS)
                self._begin(name, f"async_{kind}")
                try:
                    await async_call(self.eng, random.Random(rng.random()), kind, self.longest)
                    error = None
                except BaseException as e:  # noqa: BLE001
                    error = e
                if not self._end(name, f"async_{kind}", error):
                    return

        await asyncio.gather(*(client(f"async{i}") for i in range(n)))

