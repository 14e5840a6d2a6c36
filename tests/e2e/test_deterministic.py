"""enable_deterministic_inference on the CPU (issue 26, point 4), default model: one prompt's greedy
tokens and logprobs bit-identical alone (a batch of 1), in batches of 8 and 64 (7 and 63 random
requests), chunked (an engine with 64-token chunks, the target's 100 tokens split differently in
each batch) and unchunked (a second engine, chunked prefill off: the prompt in one step), and after a prefix-cache
hit. About 90 CPU-seconds in all (two engine starts included). A third engine serves a tiny
random Gemma 2 (sliding window 8 on every other layer, soft-capped scores, GeGLU): its target's
bits alone, in a batch of 24 with 16-token chunks and after a prefix hit, and close to HF's."""

from __future__ import annotations

import pytest

from deterministic_checks import TARGET_NEW, after_prefix_hit, alone, in_batch, signature, target_prompt

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


def test_windowed_model_same_everywhere(tmp_path, default_model_dir) -> None:
    """Sliding-window (and soft-capped) layers in the mode: the 100-token target, 12 times the
    window, gives the same bits alone, among 23 other requests in 16-token chunks, and after a
    70-token prefix hit; its tokens and logprobs are HF eager attention's (the window applied right)."""
    import torch
    from window_models import hf_greedy_and_logprobs, make_window_model, one_thread

    from treadle import Engine

    with one_thread():
        hf = make_window_model("gemma2", str(tmp_path), default_model_dir)
    vocab = hf.config.vocab_size
    target = target_prompt(vocab)
    with Engine(model_path=str(tmp_path), enable_deterministic_inference=True, chunked_prefill_size=16,
                max_running_requests=32, max_total_tokens=8192, random_seed=0) as e:
        reference = signature(alone(e, target))
        assert signature(in_batch(e, target, 24, vocab, 3)) == reference
        assert signature(after_prefix_hit(e, target, cached=70)) == reference
    tokens, logprobs = hf_greedy_and_logprobs(hf, target, TARGET_NEW)
    n = len(reference[0])
    assert list(reference[0]) == tokens[:n]
    got = torch.tensor([lp for lp, *_ in reference[1]])
    torch.testing.assert_close(got, logprobs[len(target) - 1:len(target) - 1 + n], atol=1e-4, rtol=0)


def test_speculative_sampling_without_a_seed_is_the_same_in_any_batch() -> None:
    """NGRAM drafts verified for an unseeded sampled request: the verify step draws as the sampler
    does in the mode (as if seeded), not from the shared generator, whose draws follow the batch."""
    text = "the quick brown fox jumps over the lazy dog. " * 6
    params = {"temperature": 0.8, "max_new_tokens": 24, "ignore_eos": True}
    others = [(f"Item {i}: a list of numbers", {"temperature": 0.9, "max_new_tokens": 12}) for i in range(5)]
    e = _engine(speculative_algorithm="NGRAM", speculative_num_draft_tokens=4)
    try:
        first = e.generate(text, params)
        again = e.generate(text, params)
        batch = e.generate([p for p, _ in others[:2]] + [text] + [p for p, _ in others[2:]],
                           [s for _, s in others[:2]] + [params] + [s for _, s in others[2:]])[2]
    finally:
        e.shutdown()
    assert first["meta_info"]["spec_num_proposed_drafts"] > 0  # the verify path ran
    assert again["output_ids"] == first["output_ids"] == batch["output_ids"]
