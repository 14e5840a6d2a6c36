"""Checks of config.json made in the user's process, before any child starts (issue 21 points 8-9)."""

from __future__ import annotations

import json

import pytest

from treadle.runtime.hf_config import context_length, sliding_window
from treadle.runtime.model_check import check_model, head_split_error
from treadle.runtime.server_args import ServerArgs

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100, "hidden_size": 64,
         "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 2048}


def model_dir(tmp_path, **over):
    cfg = {**LLAMA, **over}
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return str(tmp_path)


def test_a_built_model_passes(tmp_path):
    check_model(model_dir(tmp_path), ServerArgs(tp_size=3))


def test_unbuilt_architecture_is_refused_by_name(tmp_path):
    with pytest.raises(NotImplementedError, match="MambaForCausalLM.*supported: .*LlamaForCausalLM"):
        check_model(model_dir(tmp_path, architectures=["MambaForCausalLM"], model_type="mamba"), ServerArgs())


def test_model_type_alone_names_the_architecture(tmp_path):
    check_model(model_dir(tmp_path, architectures=None, model_type="mistral"), ServerArgs())


def test_context_length_above_the_model_is_refused_unless_allowed(tmp_path, monkeypatch):
    d = model_dir(tmp_path)
    with pytest.raises(ValueError, match="context_length=4096 is longer than the model's max_position_embeddings=2048"):
        check_model(d, ServerArgs(context_length=4096))
    monkeypatch.setenv("SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN", "1")
    check_model(d, ServerArgs(context_length=4096))


@pytest.mark.parametrize("heads, kv, tp, ok", [(9, 3, 2, True), (9, 3, 3, True), (9, 3, 4, False), (32, 8, 3, True),
                                              (32, 4, 8, True), (12, 1, 4, True), (6, 2, 4, False), (9, 2, 2, False)])
def test_head_split_rule(tmp_path, heads, kv, tp, ok):
    assert (head_split_error(heads, kv, tp) == "") == ok
    d = model_dir(tmp_path, num_attention_heads=heads, num_key_value_heads=kv)
    if ok:
        check_model(d, ServerArgs(tp_size=tp))
    else:
        with pytest.raises(ValueError, match=f"heads {heads}/{kv}|not a multiple"):
            check_model(d, ServerArgs(tp_size=tp))


def test_sliding_window_does_not_cap_the_context(tmp_path):
    """The attention backends mask by the window, so the model's whole context is served."""
    mistral = {**LLAMA, "architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 512}
    assert sliding_window(mistral) == 512
    assert context_length(mistral, ServerArgs()) == 2048
    assert context_length(mistral, ServerArgs(context_length=1024)) == 1024
    check_model(model_dir(tmp_path, **{k: v for k, v in mistral.items() if k not in LLAMA} | {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral"}), ServerArgs(context_length=1024))
    qwen2 = {**LLAMA, "model_type": "qwen2", "sliding_window": 512}  # named, but off unless use_sliding_window
    assert sliding_window(qwen2) is None and context_length(qwen2, ServerArgs()) == 2048
    assert sliding_window({**qwen2, "use_sliding_window": True}) == 512
    assert sliding_window({**mistral, "sliding_window": None}) is None
