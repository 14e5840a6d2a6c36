"""enable_deterministic_inference on the CPU (issue 26, point 4), default model: one prompt's greedy
tokens and logprobs bit-identical alone (a batch of 1), in batches of 8 and 64 (7 and 63 random
requests), chunked (an engine with 64-token chunks, the target's 100 tokens split differently in
each batch) and unchunked (a second engine, chunked prefill off: the prompt in one step), and after a prefix-cache
hit. About 90 CPU-seconds in all (two engine starts included)."""

from __future__ import annotations

import pytest

from deterministic_checks import after_prefix_hit, alone, in_batch, signature, target_prompt

pytestmark = pytest.mark.e2e

VOCAB = 49152


def _engine(**kw):
    from treadle import Engine

    return Engine(model_path="default", enable_deterministic_inference=True, max_running_requests=72,
                  max_total_tokens=12288, **kw)


@pytest.fixture(scope="module")
def chunked():
    e = _engine(chunked_prefill_size=64)
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def reference(chunked):
    """The target alone on the chunked engine: what every other run must equal."""
    return signature(alone(chunked, target_prompt(VOCAB)))


@pytest.mark.parametrize("size,seed", [(8, 1), (64, 2)])
def test_same_in_any_batch(chunked, reference, size: int, seed: int) -> None:
    assert signature(in_batch(chunked, target_prompt(VOCAB), size, VOCAB, seed)) == reference


def test_same_after_prefix_cache_hit(chunked, reference) -> None:
    assert signature(after_prefix_hit(chunked, target_prompt(VOCAB), cached=70)) == reference


def test_same_without_chunked_prefill(reference) -> None:
    e = _engine(chunked_prefill_size=-1)
    try:
        assert signature(alone(e, target_prompt(VOCAB))) == reference
    finally:
        e.shutdown()
