"""Gemma 2, Gemma 3 text and Mistral with sliding windows shorter than the prompts, against HF
transformers on the same tiny random weights (float32, CPU): greedy tokens of 8 prompts x 48
tokens identical to ``generate``, prompt and output logprobs within 1e-4. One engine per family
covers the acceptance's variants at once: ``tp_size=2`` (gloo), chunked prefill of 16 tokens
(longer prompts than that), and every prompt run twice, the second time from the prefix cache.
A multimodal Gemma 3 checkpoint serves its language model for text."""

from __future__ import annotations

import pytest
import torch

from treadle import Engine
from window_models import hf_greedy_and_logprobs, make_gemma3_multimodal, make_window_model, one_thread

pytestmark = pytest.mark.e2e

NEW = 48
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
           "Once upon a time, in a small village at the edge of a great forest, there lived an old",
           "List five fruits: apple, banana,", "1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89,",
           "Translate to French: the cat sleeps on the warm windowsill while the rain falls outside.",
           "Why is the sky blue? Explain it to a child in three sentences, using simple words and",
           "A"]


@pytest.fixture(scope="module", params=["gemma2", "gemma3", "mistral"])
def family(request, tmp_path_factory, default_model_dir):
    path = str(tmp_path_factory.mktemp(request.param))
    with one_thread():
        hf = make_window_model(request.param, path, default_model_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ids = [tok(p).input_ids for p in PROMPTS]
    window = hf.config.sliding_window
    assert sum(len(i) > window for i in ids) >= 5 and max(len(i) for i in ids) > 16  # windows and chunks matter
    ref = [hf_greedy_and_logprobs(hf, i, NEW) for i in ids]
    with Engine(model_path=path, tp_size=2, chunked_prefill_size=16, random_seed=0) as engine:
        params = {"temperature": 0, "max_new_tokens": NEW, "ignore_eos": True}
        # Prompt logprobs need every prompt token computed: the second run asks only for the
        # output's, so it starts from the pages the first left in the prefix cache.
        runs = [engine.generate(input_ids=ids, sampling_params=params, return_logprob=True, logprob_start_len=0),
                engine.generate(input_ids=ids, sampling_params=params, return_logprob=True)]
    return request.param, ids, ref, runs


def _logprobs(meta: dict, prompt: bool) -> torch.Tensor:
    """The engine's log-probabilities (of prompt tokens 1.. with ``prompt``) and of the output."""
    lps = [lp for lp, _, _ in meta["input_token_logprobs"][1:]] if prompt else []
    return torch.tensor(lps + [lp for lp, _, _ in meta["output_token_logprobs"]], dtype=torch.float32)


@pytest.mark.parametrize("run", [0, 1], ids=["first", "prefix_cached"])
def test_greedy_tokens_and_logprobs_match_hf(family, run):
    name, ids, ref, runs = family
    for i, (out, (want, want_lp)) in enumerate(zip(runs[run], ref)):
        assert out["output_ids"] == want, f"{name} prompt {i}: tokens differ from HF"
        got = _logprobs(out["meta_info"], prompt=run == 0)
        torch.testing.assert_close(got, want_lp[-len(got):], atol=1e-4, rtol=0, msg=lambda m: f"{name} prompt {i}: {m}")
    if run == 1:  # the second run reused the first's pages
        assert sum(o["meta_info"]["cached_tokens"] for o in runs[1]) >= sum(len(i) - 1 for i in ids) // 2


def test_gemma3_multimodal_checkpoint_serves_its_text_model(tmp_path, default_model_dir):
    with one_thread():
        hf = make_gemma3_multimodal(str(tmp_path), default_model_dir)
    from transformers import AutoTokenizer

    ids = [AutoTokenizer.from_pretrained(str(tmp_path))(p).input_ids for p in PROMPTS[2:4]]
    want = [hf_greedy_and_logprobs(hf, i, 16) for i in ids]
    with Engine(model_path=str(tmp_path), random_seed=0) as engine:
        outs = engine.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 16,
                                                                "ignore_eos": True}, return_logprob=True)
    for out, (tokens, lps) in zip(outs, want):
        assert out["output_ids"] == tokens
        torch.testing.assert_close(_logprobs(out["meta_info"], prompt=False), lps[-16:], atol=1e-4, rtol=0)
