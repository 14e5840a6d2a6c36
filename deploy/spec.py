"""The fleet spec: one TOML file says what a fleet runs (``deploy/examples/fleet.toml`` documents
every key). ``load_spec`` parses it into ``FleetSpec`` and checks everything before any process
starts: a wrong key or value is a ``ValueError`` naming it (``workers[1].port must be ...``), so a
typo never becomes a crash loop.

The engine arguments (``[engine]``, and a worker's own ``engine`` table over it) are
``ServerArgs`` fields, checked by building a ``ServerArgs`` from them; ``worker_argv`` turns them
into ``treadle serve`` flags.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any, Optional

from treadle.runtime.server_args import ServerArgs
from treadle.server.serve_args import API_KEY_ENV

BACKENDS = ("local", "ray")
POLICIES = ("cache_aware", "least_load", "round_robin")
# set by the fleet for each worker, never by the spec's engine tables
FLEET_OWNED = ("host", "port", "api_key")
SERVER_FIELDS = {f.name: f for f in dataclasses.fields(ServerArgs)}


@dataclass
class WorkerSpec:
    """One ``treadle serve`` child: its GPUs (``CUDA_VISIBLE_DEVICES``; empty on CPU), its port
    (0: any free port, chosen when it starts) and its engine arguments (the fleet's, overridden)."""

    name: str
    gpus: list[int]
    port: int
    engine: dict[str, Any]

    @property
    def tp_size(self) -> int:
        return int(self.engine.get("tp_size", 1) or 1)


@dataclass
class RouterSpec:
    """The HTTP front: its port and its policy (``cache_aware``: SGLang router's thresholds)."""

    port: int = 30000
    policy: str = "cache_aware"
    cache_threshold: float = 0.3       # share of a prompt that must match a worker's tree to follow it
    balance_abs_threshold: int = 32    # in-flight gap between the busiest and idlest worker ...
    balance_rel_threshold: float = 1.5  # ... and their ratio, both above: balance by load instead
    max_tree_chars: int = 4_000_000    # the prefix tree's size per worker before LRU eviction
    retry: bool = True                 # retry once on another worker, before the first byte went out
    max_sessions: int = 100_000        # session ids pinned to a worker (oldest forgotten first)


@dataclass
class SupervisorSpec:
    """Probes and restarts (seconds)."""

    health_interval_s: float = 5.0        # GET /health
    deep_health_interval_s: float = 30.0  # GET /health_generate (one token through the engine)
    health_timeout_s: float = 5.0
    deep_health_timeout_s: float = 30.0
    unhealthy_after: int = 3              # failed probes in a row: unhealthy (no traffic), restarted
    start_timeout_s: float = 600.0        # a start that takes longer counts as a crash
    backoff_initial_s: float = 1.0        # restart delay, doubled after each crash in a row
    backoff_max_s: float = 60.0
    crash_loop_limit: int = 5             # crashes in a row, then the worker stays down
    stable_after_s: float = 60.0          # healthy this long: the crash count starts again at 0
    drain_timeout_s: float = 30.0         # fleet down: in-flight requests get this long to finish


@dataclass
class RaySpec:
    """``backend = "ray"``: where the cluster is (``""``: start a local Ray in the supervisor)."""

    address: str = ""
    num_cpus: Optional[int] = None   # a local Ray's CPUs (None: Ray's default, all of them)
    max_restarts: int = 5            # Ray restarts a dead worker actor this often


@dataclass
class FleetSpec:
    name: str
    backend: str
    host: str
    api_key: Optional[str] = field(repr=False)  # never in a log line or a traceback's locals
    state_dir: str
    router: RouterSpec
    supervisor: SupervisorSpec
    ray: RaySpec
    workers: list[WorkerSpec] = field(default_factory=list)

    @property
    def status_path(self) -> str:
        return os.path.join(self.state_dir, "status.json")

    def log_path(self, worker: str) -> str:
        return os.path.join(self.state_dir, "logs", f"{worker}.log")


def load_spec(path: str) -> FleetSpec:
    """Read and check a fleet spec file."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None
    return parse_spec(raw, base_dir=os.path.dirname(os.path.abspath(path)))


def parse_spec(raw: dict[str, Any], base_dir: str = ".") -> FleetSpec:
    """The spec from its TOML tables; ``base_dir`` anchors a relative ``state_dir``."""
    raw = dict(raw)
    name = _pop(raw, "name", str, "fleet")
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"name must be letters, digits, '-' or '_', got {name!r}.")
    backend = _pop(raw, "backend", str, "local")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    host = _pop(raw, "host", str, "127.0.0.1")
    api_key = _pop(raw, "api_key", str, None)
    key_env = _pop(raw, "api_key_env", str, None)
    if key_env is not None:
        if api_key is not None:
            raise ValueError("api_key and api_key_env: give one of them.")
        api_key = os.environ.get(key_env) or None
        if api_key is None:
            raise ValueError(f"api_key_env names {key_env!r}, which is not set in the environment.")
    state_dir = os.path.join(base_dir, _pop(raw, "state_dir", str, f".treadle-fleet/{name}"))
    router = _table(raw, "router", RouterSpec)
    supervisor = _table(raw, "supervisor", SupervisorSpec)
    ray = _table(raw, "ray", RaySpec)
    if router.policy not in POLICIES:
        raise ValueError(f"router.policy must be one of {POLICIES}, got {router.policy!r}.")
    _check_port("router.port", router.port)
    for key in ("cache_threshold",):
        if not 0.0 <= getattr(router, key) <= 1.0:
            raise ValueError(f"router.{key} must be in [0, 1], got {getattr(router, key)!r}.")
    for spec_name, obj in (("router", router), ("supervisor", supervisor), ("ray", ray)):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                raise ValueError(f"{spec_name}.{f.name} must be >= 0, got {value!r}.")
    if supervisor.unhealthy_after < 1 or supervisor.crash_loop_limit < 1:
        raise ValueError("supervisor.unhealthy_after and supervisor.crash_loop_limit must be >= 1.")
    engine = _engine(raw.pop("engine", {}), "engine")
    workers = _workers(raw.pop("workers", 1), engine)
    if raw:
        raise ValueError(f"Unknown key(s) in the fleet spec: {', '.join(sorted(raw))}.")
    ports = [w.port for w in workers if w.port] + [router.port]
    if len(ports) != len(set(ports)):
        raise ValueError(f"Two of the fleet's ports are the same: {sorted(ports)}.")
    return FleetSpec(name, backend, host, api_key, os.path.abspath(state_dir), router, supervisor, ray, workers)


def _pop(raw: dict[str, Any], key: str, kind: type, default: Any, where: str = "") -> Any:
    value = raw.pop(key, default)
    if value is not default and not isinstance(value, kind) or kind is int and isinstance(value, bool):
        raise ValueError(f"{where}{key} must be a {kind.__name__}, got {value!r}.")
    return value


def _table(raw: dict[str, Any], key: str, cls: type) -> Any:
    table = raw.pop(key, {})
    if not isinstance(table, dict):
        raise ValueError(f"{key} must be a table ([{key}]), got {table!r}.")
    out = cls()
    for k, v in table.items():
        if not hasattr(out, k):
            raise ValueError(f"Unknown key {key}.{k}; the keys are {', '.join(f.name for f in dataclasses.fields(cls))}.")
        default = getattr(out, k)
        kinds = (int, float) if isinstance(default, float) else (type(default),) if default is not None else (int,)
        if not isinstance(v, kinds) or isinstance(v, bool) and not isinstance(default, bool):
            raise ValueError(f"{key}.{k} must be a {kinds[0].__name__}, got {v!r}.")
        setattr(out, k, float(v) if isinstance(default, float) else v)
    return out


def _engine(table: Any, where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be a table of ServerArgs fields, got {table!r}.")
    for key in table:
        if key not in SERVER_FIELDS:
            raise ValueError(f"{where}.{key} is not a ServerArgs field (the engine's arguments, SGLang's names).")
        if key in FLEET_OWNED:
            raise ValueError(f"{where}.{key} is set by the fleet (host, port and api_key are fleet-level keys).")
    return dict(table)


def _workers(raw: Any, engine: dict[str, Any]) -> list[WorkerSpec]:
    """``workers = N`` (N alike, any free ports) or ``[[workers]]`` tables, each with optional
    ``name``, ``gpus``, ``port`` and ``engine``."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        if raw < 1:
            raise ValueError(f"workers must be >= 1, got {raw}.")
        raw = [{} for _ in range(raw)]
    if not isinstance(raw, list) or not raw or not all(isinstance(t, dict) for t in raw):
        raise ValueError("workers must be a count or a list of [[workers]] tables.")
    out = []
    for i, table in enumerate(raw):
        table, where = dict(table), f"workers[{i}]."
        name = _pop(table, "name", str, f"w{i}", where)
        gpus = _pop(table, "gpus", list, [], where)
        if not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in gpus):
            raise ValueError(f"{where}gpus must be a list of GPU indexes, got {gpus!r}.")
        port = _pop(table, "port", int, 0, where)
        if port:
            _check_port(f"{where}port", port)
        merged = {**engine, **_engine(table.pop("engine", {}), f"{where}engine")}
        if table:
            raise ValueError(f"Unknown key(s) in {where[:-1]}: {', '.join(sorted(table))} (name, gpus, port, engine).")
        worker = WorkerSpec(name, gpus, port, merged)
        try:
            ServerArgs(**merged)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}engine: {e}") from None
        if gpus and len(gpus) != worker.tp_size * int(merged.get("dp_size", 1) or 1):
            raise ValueError(f"{where}gpus lists {len(gpus)} GPU(s) but the worker's tp_size x dp_size is "
                             f"{worker.tp_size * int(merged.get('dp_size', 1) or 1)}.")
        out.append(worker)
    names = [w.name for w in out]
    if len(names) != len(set(names)):
        raise ValueError(f"Worker names must differ, got {names}.")
    return out


def _check_port(where: str, port: int) -> None:
    if not 0 < port < 65536:
        raise ValueError(f"{where} must be a TCP port (1-65535), got {port}.")


def worker_env(environ: dict[str, str], api_key: Optional[str]) -> dict[str, str]:
    """A worker's environment: ``environ`` with the fleet's API key as ``TREADLE_API_KEY``, which
    ``treadle serve`` reads when ``--api-key`` is absent. Not a flag: any user of the host can
    read a process's command line (``ps``), only its owner its environment. Without a fleet key
    the variable is removed, so a worker never requires a key the router does not send."""
    env = {k: v for k, v in environ.items() if k != API_KEY_ENV}
    if api_key:
        env[API_KEY_ENV] = api_key
    return env


def worker_argv(worker: WorkerSpec, host: str, port: int) -> list[str]:
    """``treadle serve``'s flags for a worker: its engine table as ``--flag value`` (bools as
    switches, dicts as JSON, lists as several values). The API key goes in ``worker_env``."""
    argv = ["--host", host, "--port", str(port)]
    for key, value in worker.engine.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            default = SERVER_FIELDS[key].default
            if value:
                argv.append(flag)
            elif default is True:
                argv.append("--no-" + key.replace("_", "-"))
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        elif isinstance(value, list):
            argv += [flag, *(json.dumps(v) if isinstance(v, (dict, list)) else str(v) for v in value)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv
