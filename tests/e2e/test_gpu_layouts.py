"""Every parallel layout on two GPUs of one machine gives one GPU's greedy tokens (float32;
formerly ``bench/gpu_layouts_check.py``).

Seeded random weights of the Llama-3-mini shape (wide init: no near-ties); the Engine with the
default layout and with each of ``tp_size=2`` with and without the fused all-reduce + norm,
``pp_size=2`` and ``dp_size=2`` (float32, graphs and overlap where the layout has them) runs the
same 6 prompts x 32 greedy tokens in one batch, then the first 3 one call each (batch-1 decode:
with tensor parallelism, the steps whose collectives ride on tagged words). Every layout must
give one GPU's batch, in the batch and one at a time.
"""

from __future__ import annotations

import json

import pytest

from gpu_helpers import build_random_model, first_differences, needs_gpus, random_prompts, shape_dir

pytestmark = [*needs_gpus(2), pytest.mark.e2e]

LAYOUTS = {"tp2-unfused": '{"tp_size": 2, "enable_allreduce_fusion": false}', "pp2": '{"pp_size": 2}',
           "dp2": '{"dp_size": 2}', "tp2": '{"tp_size": 2}'}
ALONE = 3  # prompts also run one at a time


def run(d: str, prompts: list[list[int]], layout: dict) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy ids of ``prompts`` in one batch, and of the first ``ALONE`` one call each."""
    from treadle import Engine

    params = {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True}
    with Engine(model_path=d, dtype="float32", random_seed=0, log_level="warning", **layout) as eng:
        batched = [r["output_ids"] for r in eng.generate(input_ids=prompts, sampling_params=params)]
        alone = [eng.generate(input_ids=p, sampling_params=params)["output_ids"] for p in prompts[:ALONE]]
        return batched, alone


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("layouts")
    build_random_model(shape_dir("llama3-mini", str(root / "config")), str(root / "model"))
    return str(root / "model")


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts((5, 17, 33, 64, 100, 250))


@pytest.fixture(scope="module")
def one_gpu(model, prompts):
    return run(model, prompts, {})


def test_one_gpu_alone_matches_its_batch(one_gpu):
    ref, alone = one_gpu
    print(f"one GPU: one at a time as in the batch in {sum(x == y for x, y in zip(ref, alone))}/{ALONE} prompts")
    assert alone == ref[:ALONE], first_differences(ref[:ALONE], alone)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_one_gpu(model, prompts, one_gpu, name):
    ref = one_gpu[0]
    got, alone = run(model, prompts, json.loads(LAYOUTS[name]))
    same, same_alone = sum(x == y for x, y in zip(ref, got)), sum(x == y for x, y in zip(ref, alone))
    print(f"{LAYOUTS[name]}: greedy tokens identical to one GPU in {same}/{len(ref)} prompts "
          f"(one at a time: {same_alone}/{ALONE})")
    assert got == ref, f"in the batch, first differing token per prompt: {first_differences(ref, got)}"
    assert alone == ref[:ALONE], f"one at a time: {first_differences(ref[:ALONE], alone)}"
