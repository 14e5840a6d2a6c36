"""Tensor parallelism on the CPU (gloo): same greedy tokens as tp_size=1, weights split across ranks.

The tp_size=2 engine is the session's ``tp2_engine`` (the usage guide's configuration, which
``test_usage_guide`` checks too): one start-up of two workers for both modules."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e

PROMPTS = ["What is the capital of France?", "def add(a, b):", "The three primary colors are",
           "Once upon a time", "List five fruits:", "1, 1, 2, 3, 5, 8,", "Translate to French: cat",
           "Why is the sky blue?"]


def test_tp2_matches_tp1_and_splits_the_weights(engine, tp2_engine):
    params = {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True}
    want = [r["output_ids"] for r in engine.generate(prompt=PROMPTS, sampling_params=params)]
    full = engine._sup.ready_info["worker0"]["num_params"]
    got = [r["output_ids"] for r in tp2_engine.generate(prompt=PROMPTS, sampling_params=params)]
    shares = [tp2_engine._sup.ready_info[f"worker{r}"]["num_params"] / full for r in range(2)]
    assert got == want
    # vocab and MLP split evenly; SmolLM2's 3 KV heads split 2 + 1, so the halves differ a little
    assert all(0.35 < s < 0.65 for s in shares), shares
    assert 0.98 < sum(shares) < 1.02, shares
