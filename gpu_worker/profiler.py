"""``start_profile`` / ``stop_profile``: torch profiler traces of the worker, one file per rank.

Arguments follow SGLang's ``ProfileReq`` (``output_dir``, ``num_steps``, ``activities``,
``with_stack``, ``record_shapes``, ``profile_id``, ``profile_prefix``); the usage guide's
``profile_dir`` / ``profile_name`` are accepted as spellings of ``output_dir`` / ``profile_prefix``.
Traces are Chrome/Perfetto JSON: ``<output_dir>/[prefix-]<profile_id>-TP-<r>[-DP-<g>][-PP-<s>].trace.json.gz``.

``stop`` returns once the trace is on disk, however long that takes (a long CPU profile has
millions of events: a minute or more), with a log line when it starts and when the file is written;
the file appears under its name only when complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import gzip
import logging
import os
import shutil
import time
from typing import Any, Callable, ContextManager, Optional

import torch

from treadle.runtime.profile_args import check_profile_args

logger = logging.getLogger("treadle.worker")
_ACTIVITIES = {"CPU": torch.profiler.ProfilerActivity.CPU, "GPU": torch.profiler.ProfilerActivity.CUDA}


class Profiler:
    def __init__(self, tag: str, cuda: bool, busy: Callable[[], ContextManager[Any]] = contextlib.nullcontext) -> None:
        self.tag, self.cuda = tag, cuda  # tag: "TP-0", "TP-1-DP-1", "TP-0-PP-1"...
        # Wraps the export, which holds the GIL for long (gpu_worker/proxy_heartbeat.py: the
        # heartbeats go on meanwhile, so the client does not take the busy worker for a frozen one).
        self.busy = busy
        self.started_at = 0  # forward_ct when the running profile started
        self.prof: Optional[torch.profiler.profile] = None
        self.path = ""
        self.steps_left: Optional[int] = None
        self.forward_ct = 0  # forward steps run by this worker (the scheduler's step numbers)
        self.deferred: Optional[dict[str, Any]] = None  # a start waiting for its ``start_step``

    def start(self, args: dict[str, Any]) -> dict[str, Any]:
        """Start now, or (``start_step``: an absolute forward-step number, as SGLang) at that step."""
        check_profile_args(args)
        if self.prof is not None or self.deferred is not None:
            raise RuntimeError("Profiling is already in progress. Call /stop_profile first.")
        start_step = args.get("start_step")
        if start_step is not None and start_step > self.forward_ct + 1:  # the next forward is step forward_ct + 1
            self.deferred = dict(args)
            return {"trace": None, "start_step": start_step}
        out_dir = args.get("output_dir") or args.get("profile_dir") or os.environ.get("SGLANG_TORCH_PROFILER_DIR", "/tmp")
        prefix = args.get("profile_prefix") or args.get("profile_name")
        pid = args.get("profile_id") or str(time.time())
        os.makedirs(out_dir, exist_ok=True)
        name = f"{prefix}-{pid}" if prefix else pid
        self.path = os.path.join(os.path.abspath(out_dir), f"{name}-{self.tag}.trace.json.gz")
        acts = [_ACTIVITIES[a] for a in (args.get("activities") or ["CPU", "GPU"]) if a in _ACTIVITIES]
        if not self.cuda:
            acts = [a for a in acts if a != torch.profiler.ProfilerActivity.CUDA] or [torch.profiler.ProfilerActivity.CPU]
        self.prof = torch.profiler.profile(
            activities=acts, with_stack=bool(args.get("with_stack", True)), record_shapes=bool(args.get("record_shapes", False)),
            profile_memory="MEM" in (args.get("activities") or []))
        self.prof.start()
        self.started_at = self.forward_ct
        self.steps_left = args.get("num_steps")
        return {"trace": self.path}

    def stop(self) -> dict[str, Any]:
        if self.deferred is not None and self.prof is None:  # stopped before its start step came
            self.deferred = None
            return {"trace": None}
        if self.prof is None:
            raise RuntimeError("Profiling is not in progress. Call /start_profile first.")
        prof, self.prof, self.steps_left = self.prof, None, None
        logger.info("stop_profile: writing the trace of %d forward steps to %s", self.forward_ct - self.started_at,
                    self.path)
        with self.busy():
            export_trace(prof, self.path)
        del prof
        release_memory()
        return {"trace": self.path}

    def step(self) -> None:
        """Count a forward step; start a deferred profile at its ``start_step``; stop by itself
        after ``num_steps``."""
        self.forward_ct += 1
        if self.deferred is not None and self.forward_ct + 1 >= self.deferred["start_step"]:
            args, self.deferred = self.deferred, None
            self.start({k: v for k, v in args.items() if k != "start_step"})
            return
        if self.prof is not None and self.steps_left is not None:
            self.steps_left -= 1
            if self.steps_left <= 0:
                self.stop()


def export_trace(prof: torch.profiler.profile, path: str) -> None:
    """Stop ``prof`` and write its trace to ``path`` (``.json.gz``), logging sizes and times.

    torch's own ``.gz`` export compresses the JSON line by line at level 9: on a CPU profile of 100
    requests (6 million events, 1.7 GB of JSON) that took 2.5 minutes, 15 to 25 times longer than
    level 1 in 16 MB blocks, for a file a quarter smaller. The JSON goes to a side file first and
    the trace is renamed into place once compressed, so a file under its name is always whole."""
    raw, part = f"{path}.json.part", f"{path}.part"
    t0 = time.perf_counter()
    try:
        prof.stop()  # collects the events: most of the time, with the GIL held
        t1 = time.perf_counter()
        prof.export_chrome_trace(raw)  # not ".gz": plain JSON
        t2 = time.perf_counter()
        with open(raw, "rb") as fin, gzip.open(part, "wb", compresslevel=1) as fout:
            shutil.copyfileobj(fin, fout, 1 << 24)
        os.replace(part, path)
        json_mb = os.path.getsize(raw) / 1e6
    finally:
        for leftover in (raw, part):
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)
    t3 = time.perf_counter()
    logger.info("stop_profile: trace written: %s (%.1f MB; %.1f MB of JSON) in %.1f s (collecting the events %.1f s, "
                "writing JSON %.1f s, compressing %.1f s)", path, os.path.getsize(path) / 1e6, json_mb, t3 - t0,
                t1 - t0, t2 - t1, t3 - t2)


def release_memory() -> None:
    """Hand the collected events' memory back to the system. Collecting them costs about 1.5 KB an
    event (gigabytes for a long CPU profile); they are freed with the profile object (after a
    garbage collection: torch's profile objects hold reference cycles), but glibc keeps the freed
    pages, and the worker would stay at its peak size for the rest of its life."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)
