"""The fleet spec: what a TOML file turns into, and the errors that name the wrong key before any
process starts."""

from __future__ import annotations

import os

import pytest

from treadle.deploy.spec import load_spec, parse_spec, worker_argv, worker_env

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "examples")


def test_examples_parse(monkeypatch):
    monkeypatch.setenv("TREADLE_API_KEY", "k")
    spec = load_spec(os.path.join(EXAMPLES, "fleet.toml"))
    assert [(w.name, w.gpus, w.port) for w in spec.workers] == [("w0", [0], 30001), ("w1", [1], 30002)]
    assert spec.router.port == 30000 and spec.router.policy == "cache_aware" and spec.backend == "local"
    assert spec.state_dir.endswith(os.path.join(".treadle-fleet", "demo"))
    ray_spec = load_spec(os.path.join(EXAMPLES, "ray.toml"))
    assert ray_spec.backend == "ray" and len(ray_spec.workers) == 2


def test_worker_count_and_overrides():
    spec = parse_spec({"workers": 3, "engine": {"model_path": "default", "max_running_requests": 8}})
    assert [w.name for w in spec.workers] == ["w0", "w1", "w2"] and all(w.port == 0 for w in spec.workers)
    spec = parse_spec({"engine": {"model_path": "m"}, "api_key": "k",
                       "workers": [{"name": "a", "gpus": [2, 3], "engine": {"tp_size": 2, "disable_radix_cache": True}}]})
    w = spec.workers[0]
    assert w.engine == {"model_path": "m", "tp_size": 2, "disable_radix_cache": True} and w.tp_size == 2
    argv = worker_argv(w, "127.0.0.1", 31000)
    assert argv == ["--host", "127.0.0.1", "--port", "31000", "--model-path", "m", "--tp-size", "2",
                    "--disable-radix-cache"]


def test_the_api_key_goes_in_the_environment_not_the_command_line():
    """Any user of the host reads a process's command line (``ps``); only its owner its environment."""
    spec = parse_spec({"engine": {"model_path": "m"}, "api_key": "s3cret-key"})
    assert not any("s3cret-key" in a for a in worker_argv(spec.workers[0], "127.0.0.1", 31000))
    assert "s3cret-key" not in repr(spec)  # nor in a log line or a traceback that shows the spec
    assert worker_env({"PATH": "/bin"}, spec.api_key) == {"PATH": "/bin", "TREADLE_API_KEY": "s3cret-key"}
    # no fleet key: an inherited one is dropped (the worker would refuse the router's requests)
    assert worker_env({"PATH": "/bin", "TREADLE_API_KEY": "other"}, None) == {"PATH": "/bin"}


def test_api_key_from_env(monkeypatch):
    monkeypatch.setenv("FLEET_TEST_KEY", "s3cret")
    assert parse_spec({"api_key_env": "FLEET_TEST_KEY"}).api_key == "s3cret"
    monkeypatch.delenv("FLEET_TEST_KEY")
    with pytest.raises(ValueError, match="FLEET_TEST_KEY"):
        parse_spec({"api_key_env": "FLEET_TEST_KEY"})


@pytest.mark.parametrize("raw, field", [
    ({"backend": "k8s"}, "backend"),
    ({"workers": 0}, "workers"),
    ({"workers": [{"gpus": [0]}], "engine": {"tp_size": 2}}, "workers\\[0\\].gpus"),
    ({"workers": [{"port": 70000}]}, "workers\\[0\\].port"),
    ({"workers": [{"gpu": [0]}]}, "gpu"),
    ({"engine": {"tp": 2}}, "engine.tp"),
    ({"engine": {"port": 1}}, "engine.port"),
    ({"workers": [{"engine": {"max_new_tokens": 1}}]}, "workers\\[0\\].engine.max_new_tokens"),
    ({"engine": {"tp_size": 0}}, "tp_size"),
    ({"router": {"policy": "random"}}, "router.policy"),
    ({"router": {"cache_threshold": 2.0}}, "router.cache_threshold"),
    ({"router": {"port": "x"}}, "router.port"),
    ({"supervisor": {"health_interval": 1}}, "supervisor.health_interval"),
    ({"supervisor": {"crash_loop_limit": 0}}, "crash_loop_limit"),
    ({"workers": [{"port": 30000}]}, "ports"),
    ({"workers": [{"name": "a"}, {"name": "a"}]}, "names"),
    ({"replicas": 2}, "replicas"),
    ({"name": "my fleet"}, "name"),
])
def test_bad_spec_names_the_field(raw, field):
    with pytest.raises(ValueError, match=field):
        parse_spec(raw)


def test_bad_toml(tmp_path):
    path = tmp_path / "f.toml"
    path.write_text("workers = [\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_spec(str(path))
