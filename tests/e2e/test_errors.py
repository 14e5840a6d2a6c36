"""Bad input gets the errors of API.md section 4.3, and the same engine keeps serving."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e

OK = {"max_new_tokens": 3, "temperature": 0}


@pytest.mark.parametrize("kwargs, exc, words", [
    ({"prompt": ""}, ValueError, "empty"),
    ({"input_ids": []}, ValueError, "empty"),
    ({"prompt": "hi", "input_ids": [1, 2]}, ValueError, "not both"),
    ({}, ValueError, "prompt or input_ids"),
    ({"input_ids": [1, 10**9]}, ValueError, "vocabulary"),
    ({"input_ids": [-1, 5]}, ValueError, "vocabulary"),
    ({"input_ids": [[1, 2], [3, 49152]]}, ValueError, "vocabulary"),
    ({"prompt": "hi", "sampling_params": {"temprature": 0.5}}, TypeError, "temprature"),
    ({"prompt": "hi", "sampling_params": {"temperature": -1}}, ValueError, "temperature"),
    ({"prompt": "hi", "sampling_params": {"temperature": "hot"}}, ValueError, "temperature"),
    ({"prompt": "hi", "sampling_params": {"top_p": 0}}, ValueError, "top_p"),
    ({"prompt": "hi", "sampling_params": {"top_k": 0}}, ValueError, "top_k"),
    ({"prompt": "hi", "sampling_params": {"max_new_tokens": -1}}, ValueError, "max_new_tokens"),
    ({"prompt": "hi", "rid": ["a", "b"]}, ValueError, "rids"),
    ({"prompt": ["a", "b"], "rid": ["x", "x"]}, ValueError, "Duplicate"),
    ({"prompt": "hi", "no_such_argument": 1}, TypeError, "no_such_argument"),
    ({"prompt": "hi", "bootstrap_host": "10.0.0.1"}, NotImplementedError, "bootstrap_host"),
    ({"prompt": "hi", "return_routed_experts": True}, NotImplementedError, "return_routed_experts"),
    ({"prompt": "hi", "mm_hashes": [1]}, NotImplementedError, "mm_hashes"),
    ({"prompt": "hi", "routed_dp_rank": 1}, ValueError, r"routed_dp_rank=1 out of range \[0, 1\)"),
    ({"prompt": "hi", "cache_salt": 7}, TypeError, "cache_salt"),
    ({"prompt": "hi", "image_data": "x.png"}, ValueError, "image_data: this model"),
    ({"prompt": "hi", "audio_data": "x.wav"}, ValueError, "audio_data"),
])
def test_bad_input(engine, kwargs, exc, words):
    with pytest.raises(exc, match=words):
        engine.generate(**kwargs)
    assert engine.generate(prompt="Hello", sampling_params=OK)["meta_info"]["completion_tokens"] == 3


def test_prompt_longer_than_context(engine):
    ctx = engine.get_server_info()["context_length"]
    with pytest.raises(ValueError, match="longer than the model's context length"):
        engine.generate(input_ids=[5] * (ctx + 10), sampling_params=OK)
    with pytest.raises(ValueError, match="exceeds the model's maximum context length"):
        engine.generate(input_ids=[5] * 100, sampling_params={"max_new_tokens": ctx})
    assert engine.generate(prompt="Hello", sampling_params=OK)["meta_info"]["completion_tokens"] == 3


def test_one_bad_item_fails_the_whole_batch_before_dispatch(engine):
    before = engine.get_server_info()["internal_states"][0]["step"]
    with pytest.raises(ValueError, match="vocabulary"):
        engine.generate(input_ids=[[1, 2, 3], [10**9]], sampling_params=OK)
    after = engine.get_server_info()["internal_states"][0]["step"]
    assert after == before  # nothing ran


def test_prompt_that_cannot_fit_the_kv_pool():
    from treadle import Engine

    with Engine(model_path="default", max_total_tokens=64) as eng:
        with pytest.raises(ValueError, match="KV cache capacity"):
            eng.generate(input_ids=[5] * 100, sampling_params={"max_new_tokens": 4})
        assert eng.generate(prompt="Hi", sampling_params=OK)["meta_info"]["completion_tokens"] == 3


def test_unbuilt_arguments_at_their_defaults_are_accepted(engine):
    """SGLang code passes these with default values; only a real request for the feature is refused."""
    out = engine.generate(prompt="Hello", sampling_params=OK, require_reasoning=False, return_routed_experts=False,
                          external_trace_header=None, bootstrap_host=None, routed_dp_rank=0)
    assert out["meta_info"]["completion_tokens"] == 3


@pytest.fixture(scope="module")
def broken_weights_dir(tmp_path_factory):
    """The default model's config and tokenizer beside a safetensors file that is not one: the
    worker fails while loading, after the other processes have started."""
    import os
    import shutil

    from treadle.runtime.model_files import resolve_model_files

    src, out = resolve_model_files("default").model_dir, tmp_path_factory.mktemp("broken")
    for name in os.listdir(src):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(src, name), out)
    (out / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    return str(out)


@pytest.mark.parametrize("attempt", range(4))
def test_a_worker_failing_at_start_reports_its_cause(broken_weights_dir, attempt):
    """The worker's exception, not only its exit code, reaches the caller, every time (the exit
    used to race its failure report)."""
    from treadle import Engine

    with pytest.raises(RuntimeError) as info:
        Engine(model_path=broken_weights_dir)
    text = str(info.value)
    assert "worker0" in text and "exit code" not in text.splitlines()[0], text
    assert "safetensors" in text.lower() or "header" in text.lower(), text
