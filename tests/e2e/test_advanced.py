"""Hidden states and custom logit processors: engines started with the server flags they need."""

from __future__ import annotations

import asyncio

import pytest
import torch

from treadle import CustomLogitProcessor, Engine

pytestmark = pytest.mark.e2e


class OnlyToken(CustomLogitProcessor):
    """Forces ``custom_params["token"]`` (importable from this test module by the worker)."""

    def __call__(self, logits, custom_param_list):
        for i, p in enumerate(custom_param_list):
            keep = logits[i, p["token"]].clone()
            logits[i] = float("-inf")
            logits[i, p["token"]] = keep
        return logits


class Explodes(CustomLogitProcessor):
    """Raises after ``custom_params["after"]`` output tokens (a bug in user code, mid-generation)."""

    def __call__(self, logits, custom_param_list):
        if any(len(p["__output_ids__"]) >= p["after"] for p in custom_param_list):
            raise ZeroDivisionError("user bug")
        return logits


@pytest.fixture(scope="module")
def flagged_engine():
    eng = Engine(model_path="default", enable_return_hidden_states=True, enable_custom_logit_processor=True,
                 weight_version="v7", enable_metrics=True)
    yield eng
    eng.shutdown()


def test_usage_guide_hidden_states(flagged_engine, hf_gguf_model, hf_tokenizer):
    engine = flagged_engine
    response = engine.generate(
        prompt="Hello",
        return_hidden_states=True,
        sampling_params={"max_new_tokens": 5}
    )
    hidden_states = response["meta_info"]["hidden_states"]
    n_prompt = response["meta_info"]["prompt_tokens"]
    assert len(hidden_states) == response["meta_info"]["completion_tokens"]
    assert len(hidden_states[0]) == n_prompt and len(hidden_states[0][0]) == 576
    ids = hf_tokenizer("Hello")["input_ids"] + response["output_ids"]
    with torch.no_grad():
        ref = hf_gguf_model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    got = torch.tensor(hidden_states[0] + hidden_states[1:])
    assert torch.allclose(got, ref[: got.shape[0]], atol=1e-4, rtol=1e-4)


def test_usage_guide_custom_logit_processor(flagged_engine):
    engine = flagged_engine
    engine.register_custom_logit_processor("my_processor_function", OnlyToken)
    response = engine.generate(
        prompt="Generate a number",
        custom_logit_processor="my_processor_function",
        sampling_params={"max_new_tokens": 10, "custom_params": {"token": 33}}
    )
    assert response["output_ids"] == [33] * 10


def test_processor_class_instance_and_builtin_in_one_batch(flagged_engine):
    engine = flagged_engine
    plain = engine.generate(prompt="Count: 1, 2,", sampling_params={"temperature": 0, "max_new_tokens": 4})
    banned = plain["output_ids"][0]
    res = engine.generate(
        prompt=["Count: 1, 2,", "Count: 1, 2,", "Count: 1, 2,"],
        custom_logit_processor=[OnlyToken, "DisallowedTokensLogitsProcessor", None],
        sampling_params=[{"temperature": 0, "max_new_tokens": 4, "custom_params": {"token": 7}},
                         {"temperature": 0, "max_new_tokens": 4, "custom_params": {"token_ids": [banned]}},
                         {"temperature": 0, "max_new_tokens": 4}],
    )
    assert res[0]["output_ids"] == [7] * 4
    assert banned not in res[1]["output_ids"]
    assert res[2]["output_ids"] == plain["output_ids"]


def test_bad_processor_fails_only_the_call(flagged_engine):
    with pytest.raises(ValueError, match="cannot be loaded"):
        flagged_engine.generate(prompt="Hi", custom_logit_processor="no.such.module:Thing")
    with pytest.raises(ValueError, match="registered name"):
        flagged_engine.generate(prompt="Hi", custom_logit_processor="never_registered")
    meta = flagged_engine.generate(prompt="Hi", sampling_params={"max_new_tokens": 2})["meta_info"]
    assert meta["completion_tokens"] == 2 and meta["weight_version"] == "v7"  # the engine's weight_version


def test_enable_metrics_time_stats(flagged_engine):
    """``enable_metrics``: SGLang's time-stat keys in every chunk after the prefill, consistent with
    the request's own end-to-end latency."""
    meta = flagged_engine.generate(prompt="Hi", sampling_params={"max_new_tokens": 4})["meta_info"]
    stats = [meta[k] for k in ("queue_time", "prefill_launch_delay", "prefill_launch_latency")]
    assert all(isinstance(v, float) and v >= 0 for v in stats)
    assert sum(stats) <= meta["e2e_latency"]
    assert meta["num_retractions"] == 0 and meta["response_sent_to_client_ts"] > 1.7e9
    chunks = list(flagged_engine.generate(prompt="Hi", sampling_params={"max_new_tokens": 4}, stream=True))
    assert all("prefill_launch_latency" in c["meta_info"] for c in chunks)


def test_a_processor_that_raises_fails_only_its_request(flagged_engine):
    """The worker survives user code that raises: that request's call gets a RuntimeError naming
    the processor; a request beside it in the same batch and later calls are unaffected."""
    params = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True, "custom_params": {"after": 3}}
    plain = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}

    async def run():
        bad = flagged_engine.async_generate(prompt="Count: one, two,", sampling_params=params,
                                            custom_logit_processor=Explodes)
        good = flagged_engine.async_generate(prompt="Count: one, two,", sampling_params=plain)
        return await asyncio.gather(bad, good, return_exceptions=True)

    bad, good = asyncio.run(run())
    assert isinstance(bad, RuntimeError) and "Explodes failed: ZeroDivisionError: user bug" in str(bad), bad
    assert good["meta_info"]["completion_tokens"] == 12
    assert flagged_engine.generate(prompt="Hi", sampling_params={"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2
    assert flagged_engine._check_integrity()["num_running"] == 0
