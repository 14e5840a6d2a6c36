"""``skip_tokenizer_init=True`` (issue 26, the token-only mode RL frameworks use): token ids in,
token ids out, on a model directory that ships no tokenizer files."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.e2e
GREEDY = {"temperature": 0, "max_new_tokens": 8}
WEIGHTS_AND_CONFIGS = ("config.json", "generation_config.json", "model.safetensors")


@pytest.fixture(scope="module")
def token_only(default_model_dir, tmp_path_factory):
    from treadle import Engine

    d = tmp_path_factory.mktemp("no-tokenizer")
    for name in WEIGHTS_AND_CONFIGS:
        os.symlink(os.path.join(default_model_dir, name), d / name)
    assert not any(n.startswith("tokenizer") for n in os.listdir(d))
    eng = Engine(model_path=str(d), skip_tokenizer_init=True, random_seed=0)
    yield eng
    eng.shutdown()


def test_ids_in_ids_out_equal_the_normal_engine(token_only, engine, hf_tokenizer):
    prompts = [hf_tokenizer.encode("The capital of France is"), hf_tokenizer.encode("def fibonacci(n):")]
    out = token_only.generate(input_ids=prompts[0], sampling_params=GREEDY)
    assert "text" not in out
    assert out["output_ids"] == engine.generate(input_ids=prompts[0], sampling_params=GREEDY)["output_ids"]
    assert out["meta_info"]["completion_tokens"] == 8
    batch = token_only.generate(input_ids=prompts, sampling_params=GREEDY)
    ref = engine.generate(input_ids=prompts, sampling_params=GREEDY)
    assert [r["output_ids"] for r in batch] == [r["output_ids"] for r in ref]
    assert all("text" not in r for r in batch)
    chunks = list(token_only.generate(input_ids=prompts[1], sampling_params=GREEDY, stream=True))
    assert all("text" not in c for c in chunks)
    assert [t for c in chunks for t in c["output_ids"]] == ref[1]["output_ids"]
    # stop_token_ids and logprobs need no tokenizer
    first = ref[0]["output_ids"][2]
    stopped = token_only.generate(input_ids=prompts[0], return_logprob=True,
                                  sampling_params={**GREEDY, "stop_token_ids": [first]})
    assert stopped["output_ids"] == ref[0]["output_ids"][:3]
    assert len(stopped["meta_info"]["output_token_logprobs"]) == 3


@pytest.mark.parametrize("kwargs,words", [
    ({"prompt": "Hello"}, "cannot accept text prompts"),
    ({"input_ids": [1, 2, 3], "sampling_params": {"stop": "."}}, "stop strings need a tokenizer"),
    ({"input_ids": [1, 2, 3], "sampling_params": {"json_schema": '{"type": "object"}'}}, "json_schema needs a tokenizer"),
    ({"input_ids": [1, 2, 3], "sampling_params": {"regex": "[a-z]+"}}, "regex needs a tokenizer"),
])
def test_what_needs_text_is_refused_and_the_engine_keeps_serving(token_only, kwargs, words):
    with pytest.raises(ValueError, match=words):
        token_only.generate(**kwargs)
    assert token_only.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2
