"""The parallelism arguments' checks (SGLang's names): how many TP / PP / EP / DP ranks, on how
many nodes, meeting where, on which GPU ids. Where the ranks then run is ``parallel.py``'s job."""

from __future__ import annotations

from typing import Any

from treadle.runtime.arg_checks import check_int
from treadle.runtime.parallel import split_addr


def check_parallel_args(a: Any) -> None:
    """A ``ValueError`` naming the field for a size, node or address ``a`` (a ``ServerArgs``)
    cannot run with; whether the machine has the GPUs is ``ServerArgs.resolved()``'s check."""
    for name in ("tp_size", "dp_size", "pp_size", "ep_size", "nnodes"):
        check_int(name, getattr(a, name), lo=1)
    if a.ep_size not in (1, a.tp_size):
        raise ValueError(f"ep_size must be 1 or tp_size ({a.tp_size}), got {a.ep_size}: expert parallelism "
                         "places the experts on the tensor-parallel ranks.")
    if a.ep_size > 1 and a.pp_size > 1:
        raise ValueError("ep_size > 1 needs pp_size == 1 (expert parallelism within pipeline stages is not built).")
    check_int("node_rank", a.node_rank, lo=0, hi=a.nnodes - 1)
    if (a.tp_size * a.pp_size) % a.nnodes:
        raise ValueError(f"tp_size * pp_size ({a.tp_size * a.pp_size}) must be divisible by nnodes "
                         f"({a.nnodes}): every node runs the same number of worker ranks.")
    if a.nnodes > 1 and a.dist_init_addr is None:
        raise ValueError("dist_init_addr ('host:port' of node 0) is required when nnodes > 1.")
    if a.dist_init_addr is not None:
        split_addr(a.dist_init_addr)
    check_int("base_gpu_id", a.base_gpu_id, lo=0)
    check_int("gpu_id_step", a.gpu_id_step, lo=1)
