"""Pipeline parallelism on the CPU (gloo): same greedy tokens as one process, layers split by stage."""

from __future__ import annotations

import pytest

from treadle import Engine

pytestmark = pytest.mark.e2e

PROMPTS = ["What is the capital of France?", "def add(a, b):", "The three primary colors are",
           "Once upon a time", "List five fruits:", "1, 1, 2, 3, 5, 8,", "Translate to French: cat",
           "Why is the sky blue?"]
PARAMS = {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True}


@pytest.fixture(scope="module")
def want(engine) -> list[list[int]]:
    return [r["output_ids"] for r in engine.generate(prompt=PROMPTS, sampling_params=PARAMS)]


def _shares(eng: Engine, full: int) -> dict[str, tuple[int, float]]:
    """Per worker: (its KV-cache layers, its share of the whole model's parameters)."""
    infos = eng._sup.ready_info.items()
    return {n: (i["kv_layers"], i["num_params"] / full) for n, i in infos if n.startswith("worker")}


def test_pp2_matches_tp1_and_splits_the_layers(engine, want):
    full = engine._sup.ready_info["worker0"]["num_params"]
    with Engine(model_path="default", pp_size=2) as pp:
        got = [r["output_ids"] for r in pp.generate(prompt=PROMPTS, sampling_params=PARAMS)]
        shares = _shares(pp, full)
        assert pp.get_server_info()["pp_size"] == 2
    assert got == want
    # SmolLM2's 30 layers split 15 + 15; the embedding (first stage) and its tied head (last) are ~21% each
    assert {n: k for n, (k, _) in shares.items()} == {"worker0": 15, "worker1": 15}
    assert all(0.55 < s < 0.65 for _, s in shares.values()), shares


def test_tp2_pp2_matches_tp1(engine, want):
    full = engine._sup.ready_info["worker0"]["num_params"]
    with Engine(model_path="default", tp_size=2, pp_size=2) as eng:
        got = [r["output_ids"] for r in eng.generate(prompt=PROMPTS, sampling_params=PARAMS)]
        shares = _shares(eng, full)
    assert got == want
    assert sorted(shares) == [f"worker{r}" for r in range(4)]
    assert all(k == 15 and 0.25 < s < 0.35 for k, s in shares.values()), shares


def test_more_stages_than_layers_is_refused_before_start():
    with pytest.raises(ValueError, match="pp_size=31 exceeds the model's 30 layers"):
        Engine(model_path="default", pp_size=31)
