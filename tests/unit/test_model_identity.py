"""What a model is, decided in the user's process before any child starts (issue 24): config
overrides (``json_model_override_args``), embedding models known by their files, the
architectures refused at ``Engine(...)``, and ``get_model_info``'s shape."""

from __future__ import annotations

import json
import os

import pytest

from treadle import Engine
from treadle.client.model_info import model_info
from treadle.runtime.config_overrides import merge_config, parse_overrides
from treadle.runtime.hf_config import load_config
from treadle.runtime.model_check import ARCHITECTURES, check_model, is_embedding_model
from treadle.runtime.model_files import minilm_dir, resolve_model_files
from treadle.runtime.server_args import ServerArgs

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100, "hidden_size": 64,
         "num_hidden_layers": 4, "num_attention_heads": 4, "max_position_embeddings": 256,
         "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}


@pytest.fixture
def llama_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TREADLE_CACHE_DIR", str(tmp_path / "treadle"))
    d = tmp_path / "llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA))
    (d / "model.safetensors").write_bytes(b"w")
    (d / "tokenizer.json").write_text("{}")
    return str(d)


@pytest.mark.parametrize("value", ["{not json", "[1, 2]", "3", 5, ["a"]])
def test_overrides_must_be_a_json_object(value):
    with pytest.raises(ValueError, match="json_model_override_args must"):
        ServerArgs(json_model_override_args=value)


def test_overrides_parse_and_merge_as_sglang():
    assert parse_overrides("{}") == {} and parse_overrides('{"a": 1}') == {"a": 1} == parse_overrides({"a": 1})
    cfg = {"num_hidden_layers": 4, "rope_scaling": {"rope_type": "llama3", "factor": 8.0},
           "text_config": {"num_hidden_layers": 2, "hidden_size": 8}}
    merged = merge_config(cfg, {"num_hidden_layers": 1, "rope_scaling": {"rope_type": "yarn", "factor": 2.0},
                                "text_config": {"num_hidden_layers": 1}})
    assert merged["num_hidden_layers"] == 1 and merged["rope_scaling"] == {"rope_type": "yarn", "factor": 2.0}
    assert merged["text_config"] == {"num_hidden_layers": 1, "hidden_size": 8}  # a nested config is updated
    assert cfg["num_hidden_layers"] == 4  # the input is left alone


def test_overrides_reach_every_reader_of_the_config(llama_dir):
    files = resolve_model_files(llama_dir, config_overrides={"num_hidden_layers": 1})
    assert files.model_dir != llama_dir and files.tokenizer_dir == llama_dir
    assert load_config(files.model_dir)["num_hidden_layers"] == 1  # what the tokenizer, scheduler, workers read
    assert load_config(llama_dir)["num_hidden_layers"] == 4  # the checkpoint is not changed
    assert sorted(os.listdir(files.model_dir)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert os.path.realpath(os.path.join(files.model_dir, "model.safetensors")) == os.path.join(llama_dir,
                                                                                                "model.safetensors")
    assert resolve_model_files(llama_dir, config_overrides={"num_hidden_layers": 1}).model_dir == files.model_dir
    other = resolve_model_files(llama_dir, config_overrides={"num_hidden_layers": 2}).model_dir
    assert other != files.model_dir and load_config(other)["num_hidden_layers"] == 2
    assert resolve_model_files(llama_dir, config_overrides={}).model_dir == llama_dir


def test_overrides_are_checked_like_the_config(llama_dir):
    with pytest.raises(NotImplementedError, match=r"\['NopeForCausalLM'\]"):
        Engine(model_path=llama_dir,
               json_model_override_args='{"architectures": ["NopeForCausalLM"], "model_type": "nope"}')
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        Engine(model_path=llama_dir, context_length=200, json_model_override_args={"max_position_embeddings": 128})


def test_an_unsupported_architecture_fails_at_engine_with_the_supported_list(llama_dir):
    with open(os.path.join(llama_dir, "config.json"), "w") as f:
        json.dump({**LLAMA, "architectures": ["FalconForCausalLM"], "model_type": "falcon"}, f)
    with pytest.raises(NotImplementedError) as e:
        Engine(model_path=llama_dir)
    assert "FalconForCausalLM" in str(e.value) and f"supported: {', '.join(sorted(ARCHITECTURES))}." in str(e.value)


def test_embedding_models_are_known_by_their_files(llama_dir, tmp_path):
    assert not is_embedding_model(llama_dir)
    assert is_embedding_model(minilm_dir())  # BertModel with sentence-transformers files
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    assert is_embedding_model(str(bert))  # no LM head: it can only embed
    (tmp_path / "llama" / "1_Pooling").mkdir()
    (tmp_path / "llama" / "1_Pooling" / "config.json").write_text('{"pooling_mode_lasttoken": true}')
    assert is_embedding_model(llama_dir)  # a decoder with sentence-transformers pooling
    check_model(minilm_dir(), ServerArgs())


def test_model_info_has_sglang_keys(llama_dir):
    args = ServerArgs(model_path="org/name", served_model_name="mine", weight_version="v3",
                      preferred_sampling_params='{"temperature": 0.5}')
    args.tokenizer_path = args.model_path
    info = model_info(args, llama_dir)
    assert info == {"model_path": "org/name", "tokenizer_path": "org/name", "is_generation": True,
                    "preferred_sampling_params": '{"temperature": 0.5}', "weight_version": "v3",
                    "served_model_name": "mine", "load_format": "auto", "reasoning_parser": None,
                    "tool_call_parser": None, "model_type": "llama", "architectures": ["LlamaForCausalLM"],
                    "has_image_understanding": False, "has_audio_understanding": False}
    args.is_embedding = True
    assert model_info(args, minilm_dir())["is_generation"] is False
