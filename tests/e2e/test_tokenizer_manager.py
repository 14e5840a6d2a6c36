"""``engine.tokenizer_manager`` / ``get_tokenizer()``: what lm-eval's and RL frameworks' SGLang
backends read off an Engine (issue 26)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


def test_the_tokenizer_and_context_length_lm_eval_reads(engine, hf_tokenizer):
    tm = engine.tokenizer_manager
    assert tm is engine.tokenizer_manager and engine.get_tokenizer() is tm.tokenizer
    text = "The capital of France is"
    ids = tm.tokenizer.encode(text)
    assert ids == hf_tokenizer.encode(text)
    # the ids lm-eval sends back give what the engine's own tokenizer gives for the text
    by_ids = engine.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 4})
    by_text = engine.generate(prompt=text, sampling_params={"temperature": 0, "max_new_tokens": 4})
    assert by_ids["output_ids"] == by_text["output_ids"]
    assert tm.context_len == engine.get_server_info()["context_length"] > 0
    assert tm.server_args is engine.server_args and tm.model_path == "default" and tm.is_generation
