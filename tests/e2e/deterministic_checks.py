"""The acceptance of ``enable_deterministic_inference`` (issue 26, point 4), shared by the CPU and
the GPU test: one prompt's greedy tokens and output logprobs are bit-identical alone, inside
batches of other random requests, chunked differently, and after a prefix-cache hit."""

from __future__ import annotations

import random

TARGET_NEW = 6
GREEDY = {"temperature": 0.0, "max_new_tokens": TARGET_NEW}


def target_prompt(vocab: int, n: int = 100, seed: int = 7) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, vocab) for _ in range(n)]


def run(engine, prompts: list[list[int]], params: list[dict]) -> list[dict]:
    return engine.generate(input_ids=prompts, sampling_params=params, return_logprob=True, top_logprobs_num=3)


def signature(out: dict) -> tuple:
    """What must be bit-identical: ids, each output token's logprob and its top-3 (floats compared exactly)."""
    meta = out["meta_info"]
    return (tuple(out["output_ids"]), tuple(map(tuple, meta["output_token_logprobs"])),
            tuple(tuple(map(tuple, t)) for t in meta["output_top_logprobs"]))


def alone(engine, target: list[int]) -> dict:
    engine.flush_cache()
    return run(engine, [target], [GREEDY])[0]


def in_batch(engine, target: list[int], size: int, vocab: int, seed: int) -> dict:
    """The target among ``size - 1`` random requests (lengths 4-12, 1-4 new tokens, some sampled),
    at a random place; the prefix cache flushed first."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, vocab) for _ in range(rng.randrange(4, 13))] for _ in range(size - 1)]
    params = [{"temperature": rng.choice([0.0, 0.8]), "max_new_tokens": rng.randrange(1, 5)}
              for _ in range(size - 1)]
    at = rng.randrange(size)
    prompts.insert(at, target)
    params.insert(at, GREEDY)
    engine.flush_cache()
    return run(engine, prompts, params)[at]


def after_prefix_hit(engine, target: list[int], cached: int) -> dict:
    """The target after a request whose prompt was its first ``cached`` tokens: the target's prefill
    is an extend over that cached KV."""
    engine.flush_cache()
    run(engine, [target[:cached]], [{"max_new_tokens": 1}])
    out = run(engine, [target], [GREEDY])[0]
    assert out["meta_info"]["cached_tokens"] >= cached - 1, out["meta_info"]
    return out
