"""Where the worker ranks of a scheduler group run and how plans reach them.

``rank = pp_rank * tp_size + tp_rank`` over a world of ``tp_size * pp_size`` worker processes.
With ``nnodes`` machines, node ``r`` runs ranks ``[r * world / nnodes, (r + 1) * world / nnodes)``
and node 0 also runs the tokenizer, scheduler and detokenizer (SGLang's layout). The ranks meet in
torch.distributed at ``dist_init_addr`` (``host:port`` of node 0; on one machine a free loopback port).
On one machine plans travel over the engine's private ``ipc://`` sockets; across machines over
``tcp://host:port+1+rank`` and results back over ``tcp://host:port+1+world``, all bound by node
0's scheduler, so node 0's address is the only one any node needs to know.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

if TYPE_CHECKING:
    from treadle.runtime.server_args import ServerArgs

logger = logging.getLogger("treadle.worker")

@dataclass
class WorkerRank:
    rank: int
    tp_rank: int
    pp_rank: int
    local_rank: int  # index on its machine: picks the GPU (base_gpu_id + local_rank * gpu_id_step)
    endpoint: str  # where the scheduler's plans reach it (tcp://: the scheduler binds, the worker connects)
    local: bool  # runs on this machine (node_rank)

    @property
    def name(self) -> str:
        return f"worker{self.rank}"

    def spec_extra(self) -> dict:
        """The worker's ``ChildSpec.extra``."""
        return {"endpoint": self.endpoint, "tp_rank": self.tp_rank, "pp_rank": self.pp_rank,
                "local_rank": self.local_rank}


def split_addr(addr: str) -> tuple[str, int]:
    """``"host:port"`` (IPv6 as ``"[::1]:port"``) -> ``(host, port)``; ValueError if malformed."""
    host, sep, port = str(addr).rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"dist_init_addr must be 'host:port', got {addr!r}.")
    return host, int(port)


def world_size(args: "ServerArgs") -> int:
    return args.tp_size * args.pp_size


def reporting_rank(args: "ServerArgs") -> int:
    """The one rank that sends step results and control replies: TP rank 0 of the last stage."""
    return (args.pp_size - 1) * args.tp_size


def is_reporting(tp_rank: int, pp_rank: int, pp_size: int) -> bool:
    """Whether a worker is the reporting rank (``reporting_rank``), from its own coordinates."""
    return tp_rank == 0 and pp_rank == pp_size - 1


def _tcp(args: "ServerArgs", offset: int) -> str:
    host, port = split_addr(args.dist_init_addr or "")
    return f"tcp://{socket.gethostbyname(host)}:{port + offset}"


def worker_ranks(args: "ServerArgs", ipc_endpoint: Callable[[str], str]) -> list[WorkerRank]:
    """Every rank of the world, in rank order, with its plan endpoint and whether it runs here."""
    world = world_size(args)
    per_node = world // args.nnodes
    out = []
    for r in range(world):
        ep = _tcp(args, 1 + r) if args.nnodes > 1 else ipc_endpoint(f"worker{r}")
        out.append(WorkerRank(r, r % args.tp_size, r // args.tp_size, r % per_node, ep,
                              r // per_node == args.node_rank))
    return out


def results_endpoint(args: "ServerArgs", ipc_endpoint: Callable[[str], str]) -> str:
    """Where the reporting rank sends results (the scheduler binds it)."""
    return _tcp(args, 1 + world_size(args)) if args.nnodes > 1 else ipc_endpoint("scheduler_results")


def free_loopback_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports, free now, for the workers' rendezvous. Drawn below Linux's
    ephemeral range (32768+): a port the kernel hands out for port 0 can be handed out again, to
    any outgoing connection, before rank 0 binds it; ports here are only ever taken on purpose."""
    rng, ports = random.Random(), []
    for _ in range(1000):
        if len(ports) == n:
            break
        port = rng.randrange(20000, 32000)
        if port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
    if len(ports) == n:
        return ports
    raise RuntimeError(f"found only {len(ports)} of {n} free ports in [20000, 32000)")


def dist_env(args: "ServerArgs", free_port: int) -> dict[str, str]:
    """The workers' torch.distributed rendezvous (env://): ``dist_init_addr`` across machines; on one
    machine a free loopback port (each DP group gets its own)."""
    if args.nnodes == 1:
        return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port)}
    host, port = split_addr(args.dist_init_addr)
    return {"MASTER_ADDR": host, "MASTER_PORT": str(port)}


def check_parallel(args: "ServerArgs", model_dir: str) -> None:
    """Start-up checks that need the model: every pipeline stage gets at least one layer."""
    from treadle.runtime.hf_config import load_config

    layers = int(load_config(model_dir).get("num_hidden_layers", 0))
    if args.pp_size > layers:
        raise ValueError(f"pp_size={args.pp_size} exceeds the model's {layers} layers "
                         "(each pipeline stage needs at least one).")


def exit_when_disconnected(sock: zmq.Socket, peer: str) -> None:
    """End this process (exit code 0) when ``sock``'s tcp peer goes away. A worker reached over tcp
    (ranks on several machines) has nothing left to serve once node 0's scheduler is gone, whether
    it shut down, crashed or was killed before its final ``Shutdown`` got out; without this, the
    ranks on the other machines would wait for plans forever."""
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)

    def watch() -> None:
        while recv_monitor_message(monitor)["event"] != zmq.EVENT_DISCONNECTED:
            pass
        logger.info("lost the connection to %s; exiting", peer)
        os._exit(0)

    threading.Thread(target=watch, name="peer-watch", daemon=True).start()
