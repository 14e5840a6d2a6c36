"""Hugging Face hub ids (``org/name``) as ``model_path`` / ``tokenizer_path``: the local HF cache
first, a download through ``huggingface_hub`` when it lacks the files.

Resolution runs once, in the user's process, before any child starts; the children get the
snapshot directory (``ModelFiles``), so TP / PP ranks never touch the hub. Engines started
together on one machine share a file lock per repository and cache: one downloads, the others
wait and then find the files cached. A complete cached snapshot is used without any request
(a second start is offline-fast; ``revision`` pins a branch, tag or commit). Only what Treadle
reads is fetched: configs, tokenizer files, chat templates and the safetensors weights (those
the index names, when there is one, so a repository's duplicate ``consolidated.safetensors`` is
skipped). ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, ``HF_HOME`` and ``HF_HUB_CACHE`` are read at each
call, not at import, so they may change between engines.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
from typing import Optional

logger = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Every small file a model directory may need: config.json, generation_config.json, tokenizer
# files (tokenizer.json / _config / .model / vocab.txt / merges.txt), chat templates, the
# safetensors index, pre/processor configs, sentence-transformers modules (1_Pooling/config.json).
SMALL_FILES = ["*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt")
INDEX = "model.safetensors.index.json"


def is_hub_id(path: str) -> bool:
    """``org/name`` that is not a local path (a local directory of that name wins, as in HF)."""
    return bool(HUB_ID.match(path)) and not os.path.exists(path)


def hub_cache_dir(download_dir: Optional[str] = None) -> str:
    """Where hub snapshots live: SGLang's ``download_dir``, else ``HF_HUB_CACHE``, else
    ``$HF_HOME/hub`` (``~/.cache/huggingface/hub``), read now."""
    if download_dir:
        return os.path.abspath(os.path.expanduser(download_dir))
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.expanduser(os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")), "hub")


def offline() -> bool:
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_hub(repo_id: str, revision: Optional[str], download_dir: Optional[str], field_name: str,
                need_weights: bool = True) -> str:
    """The snapshot directory of ``repo_id`` at ``revision`` (default ``main``) holding what a model
    (``need_weights``: config and weights) or a tokenizer needs, downloading it if not cached.
    Not found, offline, or no safetensors: ``ValueError`` naming the id, revision and cache."""
    rev, cache = revision or "main", hub_cache_dir(download_dir)
    where = f"{field_name}={repo_id!r} (hub id, revision {rev!r}, cache {cache})"
    kind = "model" if field_name == "model_path" else "tokenizer"
    found, lacks = _cached(repo_id, rev, cache, kind, need_weights)
    if found and not lacks:
        return found
    if offline():
        state = f"the cached snapshot {found} lacks {lacks}" if found else "not in the cache"
        raise ValueError(f"{where}: {state}, and HF_HUB_OFFLINE is set, so nothing is downloaded. Download it "
                         f"where the hub is reachable (same revision and cache), or pass a local path.")
    try:
        lock = _repo_lock(cache, repo_id)
    except OSError as e:  # a read-only shared cache that lacks the model
        raise ValueError(f"{where}: not in the cache, and the cache cannot be written ({e}).") from None
    with lock:  # engines starting together: one downloads, the others find it cached
        found, lacks = _cached(repo_id, rev, cache, kind, need_weights)
        if found and not lacks:
            return found
        path = _download(repo_id, rev, cache, where, kind, need_weights)
    missing = _missing(path, kind, need_weights)
    if missing:
        raise ValueError(f"{where}: the repository has no {missing} (Treadle loads Hugging Face-format "
                         f"safetensors checkpoints, or a local .gguf file).")
    return path


def _cached(repo_id: str, rev: str, cache: str, kind: str, need_weights: bool) -> tuple[Optional[str], str]:
    """The cached snapshot for ``rev`` (None: none) and what it lacks ("": nothing); no request is made."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        # the patterns: files of the repository never fetched (pytorch_model.bin) do not make it incomplete
        path = snapshot_download(repo_id, revision=rev, cache_dir=cache, local_files_only=True,
                                 allow_patterns=SMALL_FILES)
    except (LocalEntryNotFoundError, OSError, ValueError) as e:  # IncompleteSnapshotError: a small file lacks
        return getattr(e, "snapshot_path", None), "files its listing names"
    return path, _missing(path, kind, need_weights)


def _missing(path: str, kind: str, need_weights: bool) -> str:
    """What a snapshot lacks ("" if nothing): a model needs config.json and its weights (every shard
    its index names), a tokenizer one of the tokenizer files."""
    if kind == "tokenizer":
        return "" if any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES) else "tokenizer files"
    if not os.path.exists(os.path.join(path, "config.json")):
        return "config.json"
    if not need_weights:
        return ""
    shards = _indexed_shards(path)
    if shards is not None:
        lost = [s for s in shards if not os.path.exists(os.path.join(path, s))]
        return f"weight shards {lost}" if lost else ""
    return "" if any(f.endswith(".safetensors") for f in os.listdir(path)) else "*.safetensors weights"


def _indexed_shards(path: str) -> Optional[list[str]]:
    index = os.path.join(path, INDEX)
    if not os.path.exists(index):
        return None
    with open(index) as f:
        return sorted(set(json.load(f).get("weight_map", {}).values()))


def _download(repo_id: str, rev: str, cache: str, where: str, kind: str, need_weights: bool) -> str:
    """Small files first; then the weights: the shards the index names, else every safetensors file."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    from huggingface_hub.errors import RevisionNotFoundError

    endpoint = os.environ.get("HF_ENDPOINT") or None
    logger.warning("Downloading %s at revision %s from the hub into %s", repo_id, rev, cache)
    try:
        path = snapshot_download(repo_id, revision=rev, cache_dir=cache, allow_patterns=SMALL_FILES, endpoint=endpoint)
        if kind == "model" and need_weights:
            shards = _indexed_shards(path)
            path = snapshot_download(repo_id, revision=rev, cache_dir=cache, endpoint=endpoint,
                                     allow_patterns=shards if shards is not None else ["*.safetensors"])
    except RevisionNotFoundError:
        raise ValueError(f"{where}: the hub has no revision {rev!r} of {repo_id}.") from None
    except GatedRepoError:
        raise ValueError(f"{where}: the repository is gated; accept its terms on the hub and log in "
                         f"(HF_TOKEN or `hf auth login`).") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{where}: no such repository on the hub (or it is private: set HF_TOKEN).") from None
    except (LocalEntryNotFoundError, OSError) as e:  # no network, hub down, a failed transfer
        raise ValueError(f"{where}: not in the cache and the download failed ({type(e).__name__}: {e}).") from None
    return path


class _repo_lock:
    """An exclusive ``flock`` on ``<cache>/.locks/<repo folder>.treadle.lock`` (process-safe)."""

    def __init__(self, cache: str, repo_id: str) -> None:
        locks = os.path.join(cache, ".locks")
        os.makedirs(locks, exist_ok=True)
        self.file = open(os.path.join(locks, "models--" + repo_id.replace("/", "--") + ".treadle.lock"), "w")

    def __enter__(self) -> "_repo_lock":
        fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
