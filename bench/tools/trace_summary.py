"""Summarise GPU traces written by ``start_profile``: is the GPU busy, and with what?

    python bench/tools/trace_summary.py /tmp/treadle-traces/*.trace.json.gz

For each trace: the window (first kernel start to last kernel end), the time some kernel ran (the
union of kernel intervals, so overlapping streams are not counted twice), the idle share (host
bubbles: the scheduler, the worker or a copy kept the GPU waiting), and the top kernels by time.
"""

from __future__ import annotations

import collections
import gzip
import json
import sys


def summarise(path: str, top: int = 12) -> None:
    with (gzip.open(path) if path.endswith(".gz") else open(path)) as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not kernels:
        print(f"{path}: no GPU kernels")
        return
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in kernels)
    busy, end = 0.0, spans[0][0]
    for a, b in spans:  # union of intervals
        if b > end:
            busy += b - max(a, end)
            end = b
    window = spans[-1][1] - spans[0][0]
    by_name: dict[str, float] = collections.defaultdict(float)
    for e in kernels:
        by_name[e["name"]] += float(e["dur"])
    print(f"{path}: window {window / 1e3:.1f} ms, GPU busy {busy / 1e3:.1f} ms ({100 * busy / window:.1f}%), "
          f"{len(kernels)} kernels")
    total = sum(by_name.values())
    for name, t in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {100 * t / total:5.1f}%  {t / 1e3:8.2f} ms  {name[:90]}")


if __name__ == "__main__":
    for p in sys.argv[1:]:
        summarise(p)
