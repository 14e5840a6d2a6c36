"""Every parallel layout on the GPUs of one machine gives one GPU's greedy tokens (float32).

    python bench/gpu_layouts_check.py --config-dir DIR [--layout '{"pp_size": 2}' ...]

Builds seeded random weights of the config (wide init: no near-ties), runs the Engine with the
default layout and with each given layout (default: ``tp_size=2``, ``pp_size=2``, ``dp_size=2``,
and ``tp_size=2`` with and without the fused all-reduce + norm; float32, graphs and overlap where the layout
has them) on the same 6 prompts x 32 greedy tokens in one batch, then the first 3 one at a time
(batch-1 decode: with tensor parallelism, the steps whose collectives ride on tagged words), and
prints how many prompts match one GPU's batch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_smoke import build_random_model  # noqa: E402

DEFAULT_LAYOUTS = ['{"tp_size": 2, "enable_allreduce_fusion": false}', '{"pp_size": 2}', '{"dp_size": 2}', '{"tp_size": 2}']


ALONE = 3  # prompts also run one at a time


def run(d: str, prompts: list[list[int]], layout: dict) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy ids of ``prompts`` in one batch, and of the first ``ALONE`` one call each."""
    from treadle import Engine

    params = {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True}
    with Engine(model_path=d, dtype="float32", random_seed=0, log_level="warning", **layout) as eng:
        batched = [r["output_ids"] for r in eng.generate(input_ids=prompts, sampling_params=params)]
        alone = [eng.generate(input_ids=p, sampling_params=params)["output_ids"] for p in prompts[:ALONE]]
        return batched, alone


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config-dir", required=True)
    p.add_argument("--layout", action="append", help="Engine kwargs as JSON")
    a = p.parse_args()
    d = tempfile.mkdtemp(prefix="treadle-layouts-")
    build_random_model(a.config_dir, d)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 40000, (int(n),), generator=g).tolist() for n in (5, 17, 33, 64, 100, 250)]
    ref, ref_alone = run(d, prompts, {})
    print(f"one GPU: one at a time as in the batch in {sum(x == y for x, y in zip(ref, ref_alone))}/{ALONE} prompts")
    for spec in a.layout or DEFAULT_LAYOUTS:
        try:
            got, alone = run(d, prompts, json.loads(spec))
            same, same_alone = sum(x == y for x, y in zip(ref, got)), sum(x == y for x, y in zip(ref, alone))
            print(f"{spec}: greedy tokens identical to one GPU in {same}/{len(ref)} prompts "
                  f"(one at a time: {same_alone}/{ALONE})", flush=True)
        except Exception as e:  # one layout failing should not hide the others' results
            print(f"{spec}: FAILED {type(e).__name__}: {e}", flush=True)


if __name__ == "__main__":
    main()
