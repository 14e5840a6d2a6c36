"""The config snapshot (runtime/config_snapshot.py) answers every attribute as transformers' own
config does, for each family Treadle builds, so workers can skip importing transformers."""

import json
import os

import pytest
import torch
import transformers

from treadle.runtime.config_snapshot import ConfigSnapshot, cached_model_config, snapshot_path, transformers_config

SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                                      "original_max_position_embeddings": 256}),
    "mistral": lambda: transformers.MistralConfig(**SMALL, sliding_window=16),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, head_dim=8),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**SMALL, num_experts=8, num_experts_per_tok=2,
                                                     moe_intermediate_size=16),
    "mixtral": lambda: transformers.MixtralConfig(**SMALL, num_local_experts=8),
    "gemma2": lambda: transformers.Gemma2Config(**SMALL, head_dim=8, sliding_window=16, final_logit_softcapping=30.0),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**SMALL, head_dim=8, sliding_window=16),
    "gemma3": lambda: transformers.Gemma3Config(text_config=dict(SMALL, head_dim=8)),
    "phi3": lambda: transformers.Phi3Config(**SMALL, torch_dtype="bfloat16"),
    "bert": lambda: transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=64),
    "llama_scores": lambda: transformers.LlamaConfig(**SMALL, architectures=["LlamaForSequenceClassification"],
                                                     id2label={0: "bad", 1: "good"}),
    "llava": lambda: transformers.LlavaConfig(text_config=dict(SMALL, model_type="llama"),
                                              vision_config=dict(hidden_size=32, intermediate_size=64,
                                                                 num_hidden_layers=2, num_attention_heads=4)),
}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TREADLE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TREADLE_CONFIG_SNAPSHOT", raising=False)


def save(config, path) -> str:
    config.save_pretrained(path)
    return str(path)


def assert_same(real, snap, where: str) -> None:
    """Every public attribute of ``real`` reads the same on ``snap`` (sub-configs recursively)."""
    for name in dir(real):
        if name.startswith("_"):
            continue
        try:
            want = getattr(real, name)
        except AttributeError:
            with pytest.raises(AttributeError):
                getattr(snap, name)
            continue
        if callable(want) and not isinstance(want, type):
            continue
        if isinstance(want, transformers.PretrainedConfig):
            assert_same(want, getattr(snap, name), f"{where}.{name}")
        elif name in snap._skipped:
            with pytest.raises(RuntimeError, match=name):
                getattr(snap, name)
        else:
            assert getattr(snap, name) == want, f"{where}.{name}"


@pytest.mark.parametrize("family", list(CONFIGS))
def test_snapshot_reads_as_transformers_config(family, tmp_path):
    model_dir = save(CONFIGS[family](), tmp_path / "model")
    first = cached_model_config(model_dir)
    assert isinstance(first, transformers.PretrainedConfig)  # the first start builds transformers' config
    assert os.path.exists(snapshot_path(model_dir))
    second = cached_model_config(model_dir)
    assert isinstance(second, ConfigSnapshot)
    assert_same(first, second, family)
    assert second.to_dict() == first.to_dict()
    assert getattr(second, "text_config", second).num_hidden_layers == 2


def test_a_copy_shares_the_snapshot_with_its_own_path(tmp_path):
    a = save(CONFIGS["llama"](), tmp_path / "a")
    b = save(CONFIGS["llama"](), tmp_path / "b")
    cached_model_config(a)
    snap = cached_model_config(b)
    assert isinstance(snap, ConfigSnapshot)
    assert snap.name_or_path == snap._name_or_path == b and snap.to_dict()["_name_or_path"] == b
    assert snapshot_path(a) == snapshot_path(b)


def test_an_edited_config_gets_a_new_snapshot(tmp_path):
    model_dir = save(CONFIGS["llama"](), tmp_path / "model")
    cached_model_config(model_dir)
    with open(os.path.join(model_dir, "config.json")) as f:
        raw = json.load(f)
    raw["rms_norm_eps"] = 1e-3
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(raw, f)
    fresh = cached_model_config(model_dir)
    assert isinstance(fresh, transformers.PretrainedConfig) and fresh.rms_norm_eps == 1e-3
    assert cached_model_config(model_dir).rms_norm_eps == 1e-3


def test_a_damaged_snapshot_is_rebuilt(tmp_path, caplog):
    model_dir = save(CONFIGS["qwen3"](), tmp_path / "model")
    cached_model_config(model_dir)
    with open(snapshot_path(model_dir), "w") as f:
        f.write("{not json")
    with caplog.at_level("WARNING", logger="treadle"):
        config = cached_model_config(model_dir)
    assert isinstance(config, transformers.PretrainedConfig) and "unreadable" in caplog.text
    assert isinstance(cached_model_config(model_dir), ConfigSnapshot)


def test_dtype_values_and_switch_off(tmp_path, monkeypatch):
    model_dir = save(CONFIGS["phi3"](), tmp_path / "model")
    real = cached_model_config(model_dir)
    snap = cached_model_config(model_dir)
    assert snap.dtype == real.dtype and isinstance(snap.dtype, (torch.dtype, str))
    monkeypatch.setenv("TREADLE_CONFIG_SNAPSHOT", "0")
    assert isinstance(cached_model_config(model_dir), transformers.PretrainedConfig)


def test_transformers_config_rebuilds_the_real_one(tmp_path):
    model_dir = save(CONFIGS["gemma2"](), tmp_path / "model")
    cached_model_config(model_dir)
    snap = cached_model_config(model_dir)
    real = transformers_config(snap)
    assert isinstance(real, transformers.Gemma2Config) and real.to_dict() == snap.to_dict()
    with torch.device("meta"):
        transformers.AutoModelForCausalLM.from_config(real)  # what weights_by_name does with it


def test_unknown_names_raise_attribute_error(tmp_path):
    model_dir = save(CONFIGS["llama"](), tmp_path / "model")
    cached_model_config(model_dir)
    snap = cached_model_config(model_dir)
    assert not hasattr(snap, "no_such_field")
    assert getattr(snap, "no_such_field", 7) == 7
    snap.extra = 3  # model code may annotate the config, as with transformers' own
    assert snap.extra == 3


def test_a_worker_with_a_snapshot_never_imports_transformers(tmp_path):
    """What the snapshot is for: a worker process (its modules, then the config) runs without
    transformers, and without the client package."""
    import subprocess
    import sys

    model_dir = save(CONFIGS["qwen3"](), tmp_path / "model")
    cached_model_config(model_dir)
    code = ("import sys; import treadle.gpu_worker.main; "
            "from treadle.runtime.config_snapshot import cached_model_config; "
            f"c = cached_model_config({model_dir!r}); assert c.num_hidden_layers == 2; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers' "
            "or m.startswith('treadle.client')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
