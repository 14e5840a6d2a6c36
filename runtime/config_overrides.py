"""SGLang's ``json_model_override_args``: values merged into config.json before the model is built.

The merged config is written once into a directory of its own under the Treadle cache
(``<cache>/overrides/<key>/``) whose other entries are symlinks to the model's files, and that
directory becomes the model directory every process reads. So each reader of config.json (the
checks in the user's process, ``hf_config.load_config`` in the tokenizer, scheduler and workers,
the model modules, the pooling and image-processor set-up) sees the same merged values, with no
reader left to forget them. The key covers the source directory, its listing and the overrides,
so a directory is written once and never changed (engines may share it while they run).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, Union


def parse_overrides(value: Union[str, dict, None], field_name: str = "json_model_override_args") -> dict[str, Any]:
    """The overrides as a dict: SGLang passes a JSON object string (``"{}"``: none); a dict is taken
    as it is. Anything else is a ``ValueError`` naming the field."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ValueError(f"{field_name} must be a JSON object string, got {value!r} ({e}).") from None
    if not isinstance(value, dict):
        raise ValueError(f"{field_name} must be a JSON object (a dict of config.json keys), got {value!r}.")
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        raise ValueError(f"{field_name} must hold JSON values only, got {value!r}.") from None
    return value


def merge_config(cfg: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with ``overrides`` applied: top-level keys are replaced, as SGLang's
    ``config.update`` does, except the nested ``*_config`` dicts (``text_config``,
    ``vision_config``), which are updated key by key so ``{"text_config": {"num_hidden_layers": 1}}``
    keeps the rest of the text model's config."""
    out = dict(cfg)
    for key, value in overrides.items():
        if key.endswith("_config") and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def overridden_dir(model_dir: str, overrides: dict[str, Any]) -> str:
    """A directory like ``model_dir`` whose config.json has ``overrides`` merged in (made once)."""
    from treadle.runtime.server_args import default_cache_dir  # (server_args checks overrides with this module)

    src = os.path.realpath(model_dir)
    names = sorted(n for n in os.listdir(src) if n != "config.json")
    key = hashlib.sha256(json.dumps([src, names, overrides], sort_keys=True).encode()).hexdigest()[:16]
    out = os.path.join(default_cache_dir(), "overrides", f"{os.path.basename(src)}-{key}")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    with open(os.path.join(src, "config.json")) as f:
        cfg = merge_config(json.load(f), overrides)
    tmp = f"{out}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in names:
        os.symlink(os.path.join(src, name), os.path.join(tmp, name))
    with open(os.path.join(tmp, "config.json"), "w") as f:  # last: its presence marks a whole directory
        json.dump(cfg, f, indent=2)
    try:
        os.rename(tmp, out)
    except OSError:  # another engine made the same directory first: its content is the same
        shutil.rmtree(tmp, ignore_errors=True)
    return out
