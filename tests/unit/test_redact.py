"""Secrets among the server args (runtime/redact.py): masked in what leaves the engine, and the
list of secret fields kept complete as ServerArgs grows."""

from __future__ import annotations

import re

from treadle.runtime.redact import MASK, SECRET_FIELDS, redact
from treadle.runtime.server_args import ServerArgs


def test_set_secrets_are_masked_and_the_rest_kept():
    args = ServerArgs(api_key="sk-1", ssl_keyfile_password="pw", admin_api_key="").to_dict()
    out = redact(args)
    assert out["api_key"] == out["ssl_keyfile_password"] == MASK
    assert out["admin_api_key"] == ""  # unset (empty): nothing to hide, and a client sees no key is set
    assert "sk-1" not in repr(out) and "pw" not in repr(out.values())
    assert {k: v for k, v in out.items() if k not in SECRET_FIELDS} == \
        {k: v for k, v in args.items() if k not in SECRET_FIELDS}
    assert args["api_key"] == "sk-1"  # a copy: the engine's own arguments keep the key
    assert redact(ServerArgs().to_dict())["api_key"] is None


def test_every_key_token_or_password_field_is_a_secret():
    """A field named like a credential must be in SECRET_FIELDS (paths such as ``ssl_keyfile`` are
    not secrets, nor counts such as ``kt_max_deferred_experts_per_token``)."""
    looks_secret = {n for n in ServerArgs.field_names()
                    if re.search(r"(key|password|passwd|secret|credentials?|(auth|access|hf|api)_token)$", n)}
    assert looks_secret, "the pattern matches nothing: check it against ServerArgs"
    assert looks_secret <= set(SECRET_FIELDS), looks_secret - set(SECRET_FIELDS)
    assert set(SECRET_FIELDS) <= ServerArgs.field_names()


def test_children_get_the_args_without_the_keys(monkeypatch, tmp_path):
    """No child process serves HTTP: the arguments written for them carry no key."""
    from types import SimpleNamespace

    from treadle.client import launch

    monkeypatch.setattr(launch, "launch_child", lambda spec, path, env: spec)  # the spec each child would read
    monkeypatch.setattr(launch, "check_parallel", lambda args, model_dir: None)
    ipc = SimpleNamespace(path=str(tmp_path), endpoint=lambda name: f"ipc://{tmp_path}/{name}")
    a = ServerArgs(device="cpu", api_key="sk-1", admin_api_key="adm-2").resolved()
    specs = launch.launch_children(a, SimpleNamespace(model_dir=str(tmp_path)), ipc)
    assert {"tokenizer", "detokenizer", "scheduler", "worker0"} <= set(specs)
    for spec in specs.values():
        assert spec.server_args["api_key"] == spec.server_args["admin_api_key"] == MASK, spec.name
        assert spec.server_args["model_path"] == a.model_path
    assert a.api_key == "sk-1"
