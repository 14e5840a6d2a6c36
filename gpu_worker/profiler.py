"""``start_profile`` / ``stop_profile``: torch profiler traces of the worker, one file per rank.

Arguments follow SGLang's ``ProfileReq`` (``output_dir``, ``num_steps``, ``activities``,
``with_stack``, ``record_shapes``, ``profile_id``, ``profile_prefix``); the usage guide's
``profile_dir`` / ``profile_name`` are accepted as spellings of ``output_dir`` / ``profile_prefix``.
Traces are Chrome/Perfetto JSON: ``<output_dir>/[prefix-]<profile_id>-TP-<r>[-DP-<g>][-PP-<s>].trace.json.gz``.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

import torch

from treadle.runtime.profile_args import check_profile_args

_ACTIVITIES = {"CPU": torch.profiler.ProfilerActivity.CPU, "GPU": torch.profiler.ProfilerActivity.CUDA}


class Profiler:
    def __init__(self, tag: str, cuda: bool) -> None:
        self.tag, self.cuda = tag, cuda  # tag: "TP-0", "TP-1-DP-1", "TP-0-PP-1"...
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
        self.steps_left = args.get("num_steps")
        return {"trace": self.path}

    def stop(self) -> dict[str, Any]:
        if self.deferred is not None and self.prof is None:  # stopped before its start step came
            self.deferred = None
            return {"trace": None}
        if self.prof is None:
            raise RuntimeError("Profiling is not in progress. Call /start_profile first.")
        prof, self.prof, self.steps_left = self.prof, None, None
        prof.stop()
        prof.export_chrome_trace(self.path)
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
