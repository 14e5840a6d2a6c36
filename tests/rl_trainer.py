"""A trainer's side of ``update_weights_from_distributed``, in plain torch as RL frameworks write
it: rank 0 of a process group of its own (rendezvous at ``tcp://host:port``, keys under the
group's name), broadcasting every tensor of a checkpoint in name order. Run as a script:

    python tests/rl_trainer.py PORT WORLD_SIZE CHECKPOINT.safetensors [GROUP_NAME]
"""

from __future__ import annotations

import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed import distributed_c10d as c10d


def trainer_group(port: int, world_size: int, group_name: str):
    timeout = timedelta(seconds=120)
    store, _, _ = next(c10d.rendezvous(f"tcp://127.0.0.1:{port}", 0, world_size, timeout=timeout))
    store = c10d.PrefixStore(group_name, store)
    group, _ = c10d._new_process_group_helper(world_size, 0, [], c10d.Backend("gloo"), store, group_name=group_name,
                                              timeout=timeout, backend_options=None)
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def main() -> None:
    port, world_size, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    group_name = sys.argv[4] if len(sys.argv) > 4 else "weight_update_group"
    group = trainer_group(port, world_size, group_name)
    print("joined", flush=True)
    tensors = load_file(path)
    for line in sys.stdin:  # one update per line the test writes: "all", or "bad" (one more, unknown tensor)
        for name in sorted(tensors):
            dist.broadcast(tensors[name].contiguous(), src=0, group=group)
        if line.strip() == "bad":
            dist.broadcast(torch.zeros(3), src=0, group=group)
        print("sent", line.strip(), flush=True)
    dist.destroy_process_group(group)


if __name__ == "__main__":
    main()
