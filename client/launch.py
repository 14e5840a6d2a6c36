"""The processes of one engine node, and how they are wired: which process gets which sockets,
arguments and environment. Node 0 runs the tokenizer, the detokenizer and, per DP group, a
scheduler and its worker ranks; another node runs only its worker ranks."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable

from treadle.client.supervisor import group_name
from treadle.runtime.model_files import ModelFiles
from treadle.runtime.parallel import check_parallel, dist_env, free_loopback_ports, results_endpoint, worker_ranks
from treadle.runtime.procs import ChildSpec, launch_child
from treadle.runtime.redact import redact
from treadle.runtime.server_args import ServerArgs
from treadle.runtime.zmq_utils import IpcDir


def launch_children(a: ServerArgs, files: ModelFiles, ipc: IpcDir) -> dict[str, Any]:
    """Start this node's processes; returns them by name. Runs on the client's I/O thread, which
    lives as long as the engine (the children's parent-death signal follows the thread that
    started them). Each DP group is a scheduler with its own workers, sockets and rendezvous
    port; group 0 keeps the plain names (``scheduler``)."""
    shared = {n: ipc.endpoint(n) for n in ("client", "tokenizer", "detokenizer")}
    sched_eps = [ipc.endpoint(group_name(g, "scheduler")) for g in range(a.dp_size)]

    def spec(name: str, module: str, eps: dict[str, str] = shared, args: ServerArgs = a, **extra: Any) -> ChildSpec:
        # no child serves HTTP, so none gets the API keys (the spec is a file in the socket directory)
        return ChildSpec(name=name, module=module, server_args=redact(args.to_dict()), model_files=files.__dict__,
                         endpoints=eps, parent_pid=os.getpid(), extra=extra)

    # Children see the user's import path, so processors named by import path resolve alike.
    path = os.pathsep.join(dict.fromkeys(os.path.abspath(p or ".") for p in sys.path if os.path.isdir(p or ".")))
    env = {"TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}
    check_parallel(a, files.model_dir)
    head = a.node_rank == 0  # node 0 serves; the other nodes run only their worker ranks
    launches = [(spec("tokenizer", "treadle.tokenizer_proc", scheduler_endpoints=sched_eps), env),
                (spec("detokenizer", "treadle.detokenizer_proc"), env)] if head else []
    for g, port in enumerate(free_loopback_ports(a.dp_size)):
        group_ep = lambda n, g=g: ipc.endpoint(group_name(g, n))  # noqa: E731
        eps = {**shared, "scheduler": sched_eps[g], "scheduler_results": results_endpoint(a, group_ep)}
        # group g's GPUs follow group g-1's: base_gpu_id + g * tp_size * pp_size (times gpu_id_step)
        ga = dataclasses.replace(a, base_gpu_id=a.base_gpu_id + g * a.tp_size * a.pp_size * a.gpu_id_step)
        workers = worker_ranks(a, group_ep)  # TP x PP ranks (runtime/parallel.py), this node's run here
        # The ranks meet through torch.distributed's env:// rendezvous: dist_init_addr or a free loopback port.
        worker_env = {**env, **dist_env(a, port)}
        launches += [(spec(group_name(g, w.name), "treadle.gpu_worker", eps, ga, dp_rank=g, **w.spec_extra()),
                      worker_env) for w in workers if w.local]
        if head:
            launches.append((spec(group_name(g, "scheduler"), "treadle.scheduler_proc", eps, ga,
                                  worker_endpoints=[w.endpoint for w in workers]), env))
    return {s.name: launch_child(s, ipc.path, e) for s, e in launches}


def serve_worker_node(procs: dict[str, Any], shutdown: Callable[[], None]) -> None:
    """``node_rank > 0`` runs only its worker ranks, which node 0's scheduler drives. As SGLang,
    block until they exit (node 0 shut down, or a rank failed), then clean up; with
    ``TREADLE_BLOCK_NONZERO_RANK_CHILDREN=0`` (or SGLang's variable) return at once and keep the
    workers until ``shutdown()``."""
    block = [os.environ.get(f"{p}_BLOCK_NONZERO_RANK_CHILDREN") for p in ("TREADLE", "SGLANG")]
    if next((b for b in block if b is not None), "1") == "0":
        return
    try:
        while all(p.poll() is None for p in procs.values()):
            time.sleep(0.2)
    finally:
        shutdown()
