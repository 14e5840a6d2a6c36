"""transformers' config of a checkpoint, without importing transformers on every start-up.

Building a config with ``AutoConfig`` imports transformers, which pulls in torch.distributed's
tensor module and accelerate: 1.2-2 s of a worker's 5 s CPU start-up, paid on every start although
the answer depends only on config.json and the library versions. The first start builds the
real config and writes a snapshot of it: every public attribute's value as transformers computes
it (defaults, aliases and properties included), sub-configs recursively, and ``to_dict()``. Later
starts rebuild a ``ConfigSnapshot`` from that file, which answers every attribute read the model
code makes with the value the real config gave. Snapshots live under
``<cache>/configs/<key>.json``; the key covers config.json's bytes and the transformers and
Treadle versions, so an edited config or an upgrade makes a new one, and a copy of a checkpoint
(the tests' tiny models in fresh temporary directories) shares its snapshot; ``name_or_path``, the
one directory-dependent value, is set to the directory being loaded. The original LLaVA layout
(whose config also comes from the vision tower's checkpoint) is always built by transformers.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
from importlib import metadata
from typing import Any, Optional

from treadle.runtime.llava_layout import is_llava_llama, load_model_config

FORMAT = 1  # bump when the snapshot layout changes
logger = logging.getLogger("treadle")


class ConfigSnapshot:
    """A transformers config's public attributes, read back from a snapshot. A name the real
    config did not have raises AttributeError, as it would; a name whose value could not be kept
    (a class, a view object) raises RuntimeError, so a reader of it is found by the tests rather
    than given a wrong default."""

    def __init__(self, class_name: str, attrs: dict[str, Any], as_dict: dict[str, Any], skipped: list[str],
                 source_dir: str) -> None:
        self.__dict__.update(attrs)
        self._class_name, self._dict, self._skipped, self._source_dir = class_name, as_dict, set(skipped), source_dir

    def __getattr__(self, name: str) -> Any:  # only reached for names the snapshot does not hold
        if not name.startswith("__") and name in self.__dict__.get("_skipped", ()):
            raise RuntimeError(f"{self._class_name}.{name} is not kept in Treadle's config snapshot; "
                               "read the transformers config (transformers_config()) for it")
        raise AttributeError(f"{self.__dict__.get('_class_name', 'config')!r} object has no attribute {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._dict)

    def __repr__(self) -> str:
        return f"ConfigSnapshot({self._class_name}, {self._source_dir})"


def cached_model_config(model_dir: str) -> Any:
    """The model's config: a ``ConfigSnapshot`` when one was written by an earlier start, else
    transformers' own (``llava_layout.load_model_config``), snapshotted for the next start.
    ``TREADLE_CONFIG_SNAPSHOT=0`` always builds transformers' config."""
    path = snapshot_path(model_dir)
    if path and os.path.exists(path):
        try:
            with open(path) as f:
                return _decode(json.load(f), model_dir)
        except (OSError, ValueError, KeyError, TypeError) as e:  # a damaged file: rebuild it
            logger.warning("config snapshot %s unreadable (%s); rebuilding it", path, e)
    config = load_model_config(model_dir)
    if path:
        _write(path, config)
    return config


def transformers_config(config: Any) -> Any:
    """A config transformers' own classes accept: ``config`` itself, or for a snapshot the real
    config built again from its checkpoint (for the rare calls that hand the config to
    transformers, e.g. shapes of a meta-device model)."""
    return load_model_config(config._source_dir) if isinstance(config, ConfigSnapshot) else config


def snapshot_path(model_dir: str) -> Optional[str]:
    """Where this checkpoint's snapshot lives; None when it is not snapshotted."""
    if os.environ.get("TREADLE_CONFIG_SNAPSHOT", "1") == "0":
        return None
    from treadle.runtime.server_args import default_cache_dir

    try:
        with open(os.path.join(model_dir, "config.json"), "rb") as f:
            raw = f.read()
        if is_llava_llama(json.loads(raw)):
            return None
        version = f"{metadata.version('transformers')}/{_treadle_version()}"
    except (OSError, ValueError, metadata.PackageNotFoundError):
        return None  # transformers reports these itself when it builds the config
    key = hashlib.sha256(b"\0".join([str(FORMAT).encode(), version.encode(), raw])).hexdigest()[:24]
    return os.path.join(default_cache_dir(), "configs", f"{key}.json")


def _treadle_version() -> str:
    try:
        return metadata.version("treadle")
    except metadata.PackageNotFoundError:  # run from a source checkout
        return "source"


def _write(path: str, config: Any) -> None:
    """Write the snapshot atomically (another rank may be reading or writing the same one); a cache
    that cannot be written only costs the next start its time."""
    try:
        data = json.dumps(_encode(config))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except (OSError, TypeError, ValueError) as e:
        logger.debug("config snapshot not written (%s)", e)


def _encode(config: Any) -> dict[str, Any]:
    """Every public, non-method attribute's value; transformers' deprecation notices for aliases
    (``torch_dtype``, ``use_return_dict``) are silenced while they are read."""
    from transformers import PretrainedConfig
    from transformers.utils import logging as hf_logging

    attrs: dict[str, Any] = {}
    skipped: list[str] = []
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        for name in dir(config):
            if name.startswith("_"):
                continue
            try:
                value = getattr(config, name)
            except AttributeError:
                continue  # absent on the real config too
            except Exception:  # a property that fails on this config: its readers must not get a value
                skipped.append(name)
                continue
            if isinstance(value, PretrainedConfig):
                attrs[name] = {"__config__": _encode(value)}
            elif callable(value) and not isinstance(value, type):
                continue  # a method
            else:
                try:
                    attrs[name] = _value(value)
                except TypeError:
                    skipped.append(name)
    finally:
        hf_logging.set_verbosity(level)
    return {"class": type(config).__name__, "attrs": attrs, "dict": _value(config.to_dict()), "skipped": skipped}


def _value(v: Any) -> Any:
    """A JSON form of an attribute value; TypeError for what has none."""
    import torch

    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, torch.dtype):
        return {"__dtype__": str(v).removeprefix("torch.")}
    if isinstance(v, (set, frozenset)):
        return {"__set__": [_value(x) for x in sorted(v, key=repr)]}
    if isinstance(v, tuple):
        return {"__tuple__": [_value(x) for x in v]}
    if isinstance(v, list):
        return [_value(x) for x in v]
    if isinstance(v, dict) and all(isinstance(k, (str, int)) for k in v):  # id2label's keys are ints
        return {"__map__": [[k, _value(x)] for k, x in v.items()]}
    raise TypeError(type(v).__name__)


def _decode(snap: dict[str, Any], model_dir: str) -> ConfigSnapshot:
    attrs = {k: _back(v, model_dir) for k, v in snap["attrs"].items()}
    as_dict = _back(snap["dict"], model_dir)
    if attrs.get("name_or_path"):  # the directory the snapshot was written from: this one now
        attrs["name_or_path"] = attrs["_name_or_path"] = as_dict["_name_or_path"] = model_dir
    return ConfigSnapshot(snap["class"], attrs, as_dict, snap["skipped"], model_dir)


def _back(v: Any, model_dir: str) -> Any:
    if isinstance(v, list):
        return [_back(x, model_dir) for x in v]
    if not isinstance(v, dict):
        return v
    if "__config__" in v:
        return _decode(v["__config__"], model_dir)
    if "__dtype__" in v:
        import torch

        return getattr(torch, v["__dtype__"])
    if "__set__" in v:
        return set(_back(x, model_dir) for x in v["__set__"])
    if "__tuple__" in v:
        return tuple(_back(x, model_dir) for x in v["__tuple__"])
    return {k: _back(x, model_dir) for k, x in v["__map__"]}
