"""Hub ids as model_path (issue 24, acceptance 1): a fake HF cache offline, by id and by revision;
a local server standing in for the hub (HF_ENDPOINT) downloads once, and only what Treadle reads;
offline with nothing cached, a clear error. Everything here is ``resolve_model_files``: no engine."""

from __future__ import annotations

import json
import os
import threading

import pytest
from fake_hub import REPO_SHA, fake_cache, fake_hub

from treadle.runtime.model_files import DEFAULT_ALIASES, resolve_model_files

OTHER_SHA = "fedcba9876543210fedcba9876543210fedcba98"
CONFIG = json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 10}).encode()
MODEL = {"config.json": CONFIG, "tokenizer.json": b'{"t": 1}', "tokenizer_config.json": b"{}",
         "model.safetensors": b"weights"}


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """An empty hub cache in HF_HUB_CACHE; online; no telemetry request to the stand-in hub."""
    import huggingface_hub.constants

    cache = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("TREADLE_CACHE_DIR", str(tmp_path / "treadle"))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    return str(cache)


def test_fake_cache_loads_offline_by_id_and_by_revision(hub_env, monkeypatch, tmp_path):
    main = fake_cache(hub_env, "org/name", MODEL)
    tagged = fake_cache(hub_env, "org/name", {**MODEL, "config.json": CONFIG + b" "}, sha=OTHER_SHA, refs=("v1",))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = resolve_model_files("org/name")
    assert files.model_dir == files.tokenizer_dir == main and files.source == "org/name"
    assert resolve_model_files("org/name", revision="v1").model_dir == tagged
    assert resolve_model_files("org/name", revision=OTHER_SHA).model_dir == tagged  # a commit id
    assert resolve_model_files("org/name", revision="main").model_dir == main
    # SGLang's download_dir names another cache; a hub id as tokenizer_path resolves the same way
    other = str(tmp_path / "other")
    fake_cache(other, "org/tok", {"tokenizer.json": b"{}"})
    with pytest.raises(ValueError, match="org/tok"):
        resolve_model_files("org/name", "org/tok")  # not in HF_HUB_CACHE
    files = resolve_model_files(fake_cache(other, "org/name", MODEL), "org/tok", download_dir=other)
    assert files.tokenizer_dir == os.path.join(other, "models--org--tok", "snapshots", REPO_SHA)


def test_offline_with_nothing_cached_names_the_id_revision_and_cache(hub_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"model_path='org/missing' \(hub id, revision 'v2', cache .*hub-cache\): "
                                         r"not in the cache, and HF_HUB_OFFLINE is set"):
        resolve_model_files("org/missing", revision="v2")
    fake_cache(hub_env, "org/noweights", {"config.json": CONFIG})  # a snapshot without its weights
    with pytest.raises(ValueError, match=r"lacks \*\.safetensors weights"):
        resolve_model_files("org/noweights")
    assert resolve_model_files("org/noweights", need_weights=False).model_dir.endswith(REPO_SHA)  # dummy weights


def test_the_smollm2_hub_id_is_the_hub_model_not_the_packaged_gguf(hub_env, monkeypatch):
    assert DEFAULT_ALIASES == ("default", "smollm2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="HuggingFaceTB/SmolLM2-135M-Instruct' \\(hub id"):
        resolve_model_files("HuggingFaceTB/SmolLM2-135M-Instruct")
    snap = fake_cache(hub_env, "HuggingFaceTB/SmolLM2-135M-Instruct", MODEL)
    assert resolve_model_files("HuggingFaceTB/SmolLM2-135M-Instruct").model_dir == snap


def test_a_missing_local_path_is_not_taken_for_a_hub_id(hub_env):
    with pytest.raises(ValueError, match="is not a local directory, a .gguf file or a hub id"):
        resolve_model_files("./no/such/dir")


def sharded_repo() -> dict[str, bytes]:
    """Two indexed shards, plus files Treadle never reads: PyTorch weights, an unindexed duplicate."""
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    return {"config.json": CONFIG, "tokenizer.json": b"{}", "chat_template.jinja": b"{{ x }}",
            "model.safetensors.index.json": json.dumps(index).encode(), "1_Pooling/config.json": b'{"p": 1}',
            "model-00001-of-00002.safetensors": b"one", "model-00002-of-00002.safetensors": b"two",
            "consolidated.safetensors": b"duplicate", "pytorch_model.bin": b"pickle", "README.md": b"#"}


def test_the_hub_download_is_made_once_and_only_of_what_is_read(hub_env, monkeypatch):
    with fake_hub() as (url, hub):
        hub.add("org/sharded", sharded_repo())
        monkeypatch.setenv("HF_ENDPOINT", url)
        path = resolve_model_files("org/sharded").model_dir
        got = {os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs}
        assert got == {"config.json", "tokenizer.json", "chat_template.jinja", "model.safetensors.index.json",
                       "1_Pooling/config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
        assert open(os.path.join(path, "model-00002-of-00002.safetensors"), "rb").read() == b"two"
        before = len(hub.requests)
        assert resolve_model_files("org/sharded").model_dir == path  # a second start: from the cache
        assert len(hub.requests) == before
        with pytest.raises(ValueError, match="the hub has no revision 'v9' of org/sharded"):
            resolve_model_files("org/sharded", revision="v9")
        with pytest.raises(ValueError, match="'org/absent'.*no such repository on the hub"):
            resolve_model_files("org/absent")
        hub.add("org/bin-only", {"config.json": CONFIG, "tokenizer.json": b"{}", "pytorch_model.bin": b"pickle"})
        with pytest.raises(ValueError, match=r"'org/bin-only'.*has no \*\.safetensors weights"):
            resolve_model_files("org/bin-only")
        assert hub.gets("pytorch_model.bin") == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_files("org/sharded").model_dir == path


def test_engines_starting_together_download_once(hub_env, monkeypatch):
    with fake_hub() as (url, hub):
        hub.add("org/sharded", sharded_repo())
        monkeypatch.setenv("HF_ENDPOINT", url)
        out: list = []
        threads = [threading.Thread(target=lambda: out.append(resolve_model_files("org/sharded").model_dir))
                   for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(out) == 3 and len(set(out)) == 1
        assert hub.gets("model-00001-of-00002.safetensors") == hub.gets("config.json") == 1
        # one download (small files, then the shards) asked for the revision; the others found the cache
        assert sum(1 for m, p in hub.requests if p.startswith("/api/models/org/sharded/revision/")) == 2


def test_an_unreachable_hub_is_a_clear_error(hub_env, monkeypatch):
    from local_http import closed_port

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(ValueError, match=r"'org/name' \(hub id, revision 'main', cache .*\): not in the cache and "
                                         r"the download failed"):
        resolve_model_files("org/name")
