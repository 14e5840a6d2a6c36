"""enable_deterministic_inference on CUDA (issue 26, point 4): bfloat16, the Triton attention, CUDA
graphs and overlap scheduling on (the defaults). One prompt's greedy tokens and logprobs
bit-identical alone, in batches of 1, 8 and 64 random requests, chunked (64-token chunks) and
unchunked (a second engine), and after a prefix-cache hit; at the SmolLM2-135M and Llama-3-mini
shapes (head_dim 64 and 128) on seeded random weights; and at tp_size=2 on two GPUs."""

from __future__ import annotations

import pytest
import torch

from deterministic_checks import after_prefix_hit, alone, in_batch, signature, target_prompt
from gpu_helpers import build_random_model, needs_gpus, shape_dir

pytestmark = [*needs_gpus(1), pytest.mark.e2e]


@pytest.mark.parametrize("shape", ["smollm2", "llama3-mini"])
def test_deterministic_on_cuda(tmp_path, shape: str) -> None:
    from transformers import AutoConfig

    from treadle import Engine

    model = str(tmp_path / "model")
    build_random_model(shape_dir(shape, str(tmp_path / "config")), model, 0.1)
    vocab = min(AutoConfig.from_pretrained(model).vocab_size, 49152)
    target = target_prompt(vocab)
    e = Engine(model_path=model, enable_deterministic_inference=True, chunked_prefill_size=64,
               mem_fraction_static=0.5)
    try:
        ref = signature(alone(e, target))
        for size, seed in ((1, 0), (8, 1), (64, 2), (64, 3)):
            assert signature(in_batch(e, target, size, vocab, seed)) == ref, (size, seed)
        assert signature(after_prefix_hit(e, target, cached=70)) == ref
    finally:
        e.shutdown()
    e = Engine(model_path=model, enable_deterministic_inference=True, chunked_prefill_size=-1,
               mem_fraction_static=0.5)
    try:
        assert signature(alone(e, target)) == ref
        assert signature(in_batch(e, target, 64, vocab, 4)) == ref
    finally:
        e.shutdown()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_deterministic_tp2_on_cuda(tmp_path) -> None:
    """tp_size=2 (each all-reduce sums two parts: order-free): alone, in a batch of 64, prefix hit."""
    from treadle import Engine

    model = str(tmp_path / "model")
    build_random_model(shape_dir("smollm2", str(tmp_path / "config")), model, 0.1)
    target = target_prompt(49152)
    e = Engine(model_path=model, enable_deterministic_inference=True, chunked_prefill_size=64, tp_size=2,
               mem_fraction_static=0.5)
    try:
        ref = signature(alone(e, target))
        assert signature(in_batch(e, target, 64, 49152, 5)) == ref
        assert signature(after_prefix_hit(e, target, cached=70)) == ref
    finally:
        e.shutdown()
