"""Serving benchmark in the style of ``sglang.bench_serving``: requests arrive at a rate, stream
their tokens, and the figures are TTFT, inter-token latency (ITL) and end-to-end latency (median,
p99) and output tok/s. The same workload also runs in-process (``Engine.async_generate``, same
arrival times), so the cost of HTTP is measured at the same load.

    python bench/serve_bench.py --shape llama8b --num-prompts 100 --request-rate 1      # SGLang's CI online case
    python bench/serve_bench.py --shape llama8b --num-prompts 500 --request-rate inf    # the offline CI workload
    python bench/serve_bench.py --base-url http://127.0.0.1:30000 ...                   # a server already running

Prompts are random ids (``common.random_workload``: input lengths uniform in ``--input-range``,
outputs in ``--output-range``, ``ignore_eos``, greedy), seed 1 as every benchmark here. Without
``--base-url`` it starts ``python -m treadle.serve`` itself (dummy weights for ``--shape``, or
``--model-path``) and stops it with SIGTERM. ``--mode`` picks HTTP, in-process or both (the HTTP
run first: one engine on the card at a time). ITL is the gap between two streamed chunks spread
over the tokens the later one carries. Requests go to SGLang's native ``/generate``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

from common import CONFIGS, Results, bench_parser, config_model_dir, engine_kwargs, random_workload, smollm2_tokenizer_dir

SHAPES = {"smollm2": "smollm2-135m", "llama8b": "llama-3.1-8b", "gemma3_12b": "gemma-3-12b",
          "qwen3_8b": "qwen3-8b"}


@dataclass
class Outcome:
    """One request's timeline: its chunks' arrival times and token counts."""
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    itls: list[float] = field(default_factory=list)


class Timeline:
    """Records a stream's chunks as they come (``chunk(total_tokens)``)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.last: Optional[float] = None
        self.out = Outcome()

    def chunk(self, total_tokens: int) -> None:
        now, new = time.perf_counter(), total_tokens - self.out.output_tokens
        if new <= 0:
            return
        if self.last is None:
            self.out.ttft = now - self.start
            new -= 1
        if new > 0 and self.last is not None:
            self.out.itls.extend([(now - self.last) / new] * new)
        self.last, self.out.output_tokens = now, total_tokens

    def end(self) -> Outcome:
        self.out.ok, self.out.latency = True, time.perf_counter() - self.start
        return self.out


# ---------------------------------------------------------------- the two clients

async def http_request(client: Any, url: str, ids: list[int], params: dict[str, Any]) -> Outcome:
    tl = Timeline()
    body = {"input_ids": ids, "sampling_params": params, "stream": True}
    try:
        async with client.stream("POST", f"{url}/generate", json=body) as r:
            if r.status_code != 200:
                return Outcome(error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Outcome(error=str(chunk["error"]))
                tl.chunk(chunk["meta_info"]["completion_tokens"])
        return tl.end()
    except Exception as e:  # noqa: BLE001 - a failed request is a figure, not a crash
        return Outcome(error=f"{type(e).__name__}: {e}")


async def engine_request(engine: Any, ids: list[int], params: dict[str, Any]) -> Outcome:
    tl = Timeline()
    try:
        async for chunk in await engine.async_generate(input_ids=ids, sampling_params=params, stream=True):
            tl.chunk(chunk["meta_info"]["completion_tokens"])
        return tl.end()
    except Exception as e:  # noqa: BLE001
        return Outcome(error=f"{type(e).__name__}: {e}")


async def arrivals(n: int, rate: float, seed: int) -> AsyncIterator[int]:
    """Request indices at Poisson arrival times (``rate`` per second; inf: all at once)."""
    rng = random.Random(seed)
    for i in range(n):
        yield i
        if rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))


async def run_load(send: Any, ins: list[list[int]], outs: list[int], rate: float) -> tuple[list[Outcome], float]:
    tasks = []
    t0 = time.perf_counter()
    async for i in arrivals(len(ins), rate, seed=2):
        params = {"max_new_tokens": outs[i], "ignore_eos": True, "temperature": 0}
        tasks.append(asyncio.create_task(send(ins[i], params)))
    done = await asyncio.gather(*tasks)
    return list(done), time.perf_counter() - t0


def figures(done: list[Outcome], seconds: float) -> dict[str, Any]:
    ok = [o for o in done if o.ok]
    itls = [x for o in ok for x in o.itls]

    def pct(xs: list[float], q: float) -> float:
        return round(1000 * sorted(xs)[min(len(xs) - 1, int(q * len(xs)))], 2) if xs else 0.0

    out_tokens = sum(o.output_tokens for o in ok)
    return {
        "completed": len(ok), "failed": len(done) - len(ok), "seconds": round(seconds, 1),
        "output_tok_s": round(out_tokens / seconds, 1), "request_s": round(len(ok) / seconds, 3),
        "ttft_ms_median": round(1000 * statistics.median([o.ttft for o in ok]), 2) if ok else 0.0,
        "ttft_ms_p99": pct([o.ttft for o in ok], 0.99),
        "itl_ms_median": round(1000 * statistics.median(itls), 2) if itls else 0.0, "itl_ms_p99": pct(itls, 0.99),
        "e2e_ms_median": round(1000 * statistics.median([o.latency for o in ok]), 1) if ok else 0.0,
        "errors": sorted({o.error for o in done if not o.ok})[:3],
    }


# ---------------------------------------------------------------- the server and the engine

def cli_flags(kwargs: dict[str, Any]) -> list[str]:
    """Engine kwargs as ``treadle serve`` flags (SGLang's spelling: ``--tp-size 2``, ``--disable-cuda-graph``)."""
    flags = []
    for k, v in kwargs.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            flags.append(flag)
        elif v is not False and v is not None:
            flags += [flag, json.dumps(v) if isinstance(v, (dict, list)) else str(v)]
    return flags


def _die_with_parent() -> None:
    """In the server's child before exec: SIGTERM it when this benchmark dies (a ``timeout`` kill
    must not leave a server holding the card for the next run; Linux's parent-death signal)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_server(model_dir: str, kwargs: dict[str, Any], port: int, log_path: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "treadle.serve", "--model-path", model_dir, "--port", str(port), *cli_flags(kwargs)]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_die_with_parent)
    import httpx

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"treadle serve exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError(f"treadle serve did not become healthy in 600 s; see {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


async def over_http(url: str, ins: list[list[int]], outs: list[int], rate: float) -> tuple[list[Outcome], float]:
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        await http_request(client, url, ins[0][:16], {"max_new_tokens": 8, "ignore_eos": True})  # warm up
        return await run_load(lambda ids, p: http_request(client, url, ids, p), ins, outs, rate)


async def in_process(engine: Any, ins: list[list[int]], outs: list[int], rate: float) -> tuple[list[Outcome], float]:
    await engine_request(engine, ins[0][:16], {"max_new_tokens": 8, "ignore_eos": True})
    return await run_load(lambda ids, p: engine_request(engine, ids, p), ins, outs, rate)


def prompt_vocab(model_dir: str) -> int:
    """The range of the random prompt ids: the tokenizer's size (a GGUF or ``default`` model has no
    config.json until converted); a server of unknown model (``--base-url`` alone) gets ids below
    32,000, which every vocabulary here has."""
    if not model_dir:
        return 32000
    from transformers import AutoTokenizer

    from treadle.runtime.model_files import resolve_model_files

    return len(AutoTokenizer.from_pretrained(resolve_model_files(model_dir).tokenizer_dir))


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` ends us through the finally blocks
    p = bench_parser(__doc__, tokenizer=True)
    p.add_argument("--shape", choices=sorted(SHAPES), help="a config-only shape with dummy weights")
    p.add_argument("--model-path", default="", help="a real model instead of --shape")
    p.add_argument("--base-url", default="", help="benchmark a server already running (HTTP mode only)")
    p.add_argument("--mode", choices=("http", "inprocess", "both"), default="both")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests per second (inf: all at once)")
    p.add_argument("--input-range", default="1,4096")
    p.add_argument("--output-range", default="1,2048")
    p.add_argument("--port", type=int, default=30123)
    a = p.parse_args()
    kwargs = engine_kwargs(a)
    tmp = model_dir = ""
    if a.model_path:
        model_dir = a.model_path
    elif a.shape:
        tmp = model_dir = config_model_dir(os.path.join(CONFIGS, SHAPES[a.shape], "config.json"),
                                           a.tokenizer_dir or smollm2_tokenizer_dir(), f"treadle-serve-{a.shape}-")
        kwargs = {"load_format": "dummy", "random_seed": 0, **kwargs}
    elif not a.base_url:
        p.error("give --shape, --model-path or --base-url")
    vocab = prompt_vocab(model_dir)
    in_range = tuple(int(x) for x in a.input_range.split(","))
    out_range = tuple(int(x) for x in a.output_range.split(","))
    ins, outs = random_workload(a.num_prompts, in_range, out_range, seed=1, vocab=vocab)
    res = Results("serve_bench", a.out, kwargs, shape=a.shape or a.model_path or a.base_url,
                  prompts=a.num_prompts, request_rate=str(a.request_rate))
    try:
        if a.mode in ("http", "both"):
            proc, url = None, a.base_url
            if not url:
                url = f"http://127.0.0.1:{a.port}"
                proc = start_server(model_dir, kwargs, a.port, os.path.join(tmp or "/tmp", "serve_bench_server.log"))
            try:
                done, seconds = asyncio.run(over_http(url, ins, outs, a.request_rate))
            finally:
                if proc is not None:
                    stop_server(proc)
            res.record("http", **figures(done, seconds))
        if a.mode in ("inprocess", "both") and model_dir:
            from treadle import Engine

            with Engine(model_path=model_dir, log_level="warning", **kwargs) as engine:
                done, seconds = asyncio.run(in_process(engine, ins, outs, a.request_rate))
            res.record("inprocess", **figures(done, seconds))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
