"""Tree verification: several draft continuations checked in one target forward.

A tree row holds the request's last token (node 0) and ``k`` draft nodes; ``parents[i - 1]`` is the
node before node ``i`` (always an earlier node, 0 for a first draft). The row is booked like a
chain (``k + 1`` KV locations, table positions ``pos .. pos + k``), but node ``i`` sits at position
``pos + depth(i)`` for RoPE and attends to the cached prefix plus its own ancestors only (the
attention mask of ``tree_mask``). The accepted path then has its KV copied to the locations of
positions ``pos + 1 ..`` (``move_path_kv``), so the request's cache stays a plain sequence and the
scheduler rolls back exactly as after a chain.

Acceptance walks from the root. Greedy: go to the child whose token is the target's argmax at the
current node; none -> stop and emit the argmax. Sampling (drafts are point masses: n-gram tokens,
or an EAGLE head's top-k, chosen without randomness): the children are tried in turn, child ``c``
accepted with probability ``p(c)``, else ``c`` is removed from ``p`` and ``p`` renormalized; when
every child fails, the token is drawn from what is left. Each step therefore draws exactly from
``p`` (SGLang's tree sampling, target-only), so the output keeps the target distribution.
"""

from __future__ import annotations

from typing import Optional

import torch


def depths(parents: list[int]) -> list[int]:
    """Depth of every node (root 0), from the parent list of nodes ``1..k``."""
    d = [0]
    for i, par in enumerate(parents, start=1):
        if not 0 <= par < i:
            raise ValueError(f"tree node {i} has parent {par}: parents must be earlier nodes")
        d.append(d[par] + 1)
    return d


def tree_mask(parents: list[int], device: Optional[torch.device] = None) -> torch.Tensor:
    """``[k + 1, k + 1]`` bool: node ``i`` sees node ``j`` iff ``j`` is ``i`` or one of its ancestors."""
    n = len(parents) + 1
    mask = torch.eye(n, dtype=torch.bool)
    for i, par in enumerate(parents, start=1):
        mask[i] |= mask[par]
    return mask.to(device) if device is not None else mask


def children(parents: list[int]) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for i, par in enumerate(parents, start=1):
        out[par].append(i)
    return out


def accept_tree_greedy(targets: list[int], tokens: list[int], parents: list[int]) -> tuple[list[int], list[int]]:
    """``targets``: the target's argmax at each node; ``tokens``: the nodes' tokens (root first).
    Returns the produced tokens (accepted drafts, then the target's own) and the accepted path's
    nodes (root first)."""
    kids, node, path = children(parents), 0, [0]
    while True:
        nxt = next((c for c in kids[node] if tokens[c] == targets[node]), None)
        if nxt is None:
            return [tokens[c] for c in path[1:]] + [targets[node]], path
        node = nxt
        path.append(node)


def accept_tree_sampled(p: torch.Tensor, tokens: list[int], parents: list[int],
                        gen: Optional[torch.Generator]) -> tuple[list[int], list[int]]:
    """Rejection sampling down the tree with point-mass drafts: ``p [k + 1, V]`` the target
    distributions at the nodes. Returns the produced tokens and the accepted path's nodes."""
    kids, node, path = children(parents), 0, [0]
    while True:
        dist, nxt = p[node].clone(), None
        for c in kids[node]:
            tok = tokens[c]
            mass = float(dist.sum())
            if mass <= 0:
                break
            if float(torch.rand(1, generator=gen, device=p.device)) * mass < float(dist[tok]):
                nxt = c
                break
            dist[tok] = 0.0
        if nxt is None:
            last = dist if float(dist.sum()) > 0 else p[node]
            tok = int(torch.multinomial(last, 1, generator=gen))
            return [tokens[c] for c in path[1:]] + [tok], path
        node = nxt
        path.append(node)


def move_path_kv(buf: torch.Tensor, locs: list[int], path: list[int]) -> None:
    """Copy the accepted nodes' K/V (every layer; ``buf [2, layers, tokens, ...]``) to the
    locations of positions ``pos + 1 ..`` (``locs[1 ..]``): node ``path[j]`` -> ``locs[j]``. Sources
    are gathered before the write, so overlapping moves are safe."""
    moves = [(locs[n], locs[j]) for j, n in enumerate(path) if n != j]
    if not moves:
        return
    src = torch.tensor([s for s, _ in moves], device=buf.device)
    dst = torch.tensor([d for _, d in moves], device=buf.device)
    if buf.element_size() == 1:  # FP8 K/V: index_put has no float8 kernel; move the bytes
        buf = buf.view(torch.uint8)
    buf[:, :, dst] = buf[:, :, src]


def tree_attention(rows: list[tuple[int, int, list[int], int]], locs: torch.Tensor, positions: torch.Tensor
                   ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The attention extras of a step's tree rows ``(row index, first token index, parents, start
    position)``: each row's own KV locations and ancestor mask (``ForwardContext.tree``); the rows'
    ``positions`` are rewritten in place to ``start + depth``."""
    out = {}
    for r, off, parents, start in rows:
        n = len(parents) + 1
        positions[off:off + n] = start + torch.tensor(depths(parents), device=positions.device)
        out[r] = (locs[off:off + n], tree_mask(parents, locs.device))
    return out


_TREE_BACKEND: Optional[object] = None


def tree_backend(current: object) -> object:
    """The backend of a step with tree rows: ``current`` if it reads the tree masks, else the
    torch-native one (on CUDA too: the Triton kernels are causal only, so such a step runs
    attention through SDPA with explicit masks, on the same KV pool)."""
    global _TREE_BACKEND
    if getattr(current, "supports_tree", False):
        return current
    if _TREE_BACKEND is None:
        from treadle.gpu_worker.attention.torch_native import TorchNativeBackend

        _TREE_BACKEND = TorchNativeBackend()
    return _TREE_BACKEND


def check_tree_model(model: torch.nn.Module) -> None:
    """Refuse tree verification at start-up for a model with sliding-window layers (the torch-native
    windowed masks assume a chain), rather than at a request's first verify."""
    if any(getattr(m, "sliding_window", None) for m in model.modules()):
        raise ValueError("speculative_eagle_topk > 1 (tree verification) does not run on models with "
                         "sliding-window attention yet: use speculative_eagle_topk=1")
