"""``get_weights_by_name``: a checkpoint tensor read back out of the running model, by its Hugging
Face name, as SGLang returns it (the first ``truncate_size`` rows as float32 lists). RL frameworks
use it to check that an update arrived. The model keeps some tensors fused (``q_proj`` / ``k_proj``
/ ``v_proj`` in ``qkv_proj``, ``gate_proj`` / ``up_proj`` in ``gate_up_proj``): those are sliced
back out. One GPU (or CPU) only: with ``tp_size`` or ``pp_size`` > 1 no single rank holds a whole
tensor, and gathering them is not built yet."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from treadle.gpu_worker.distributed import pp_size, tp_size


def weights_by_name(model: nn.Module, name: str, truncate_size: int) -> dict[str, Any]:
    """``{"weights": rows}``, or ``{"error": ..., "kind": "value" | "not_implemented"}`` for the
    client to raise as the matching exception (a control call's own failure is a RuntimeError)."""
    try:
        return {"weights": _read(model, name, truncate_size)}
    except ValueError as e:
        return {"error": str(e), "kind": "value"}
    except NotImplementedError as e:
        return {"error": str(e), "kind": "not_implemented"}


def _read(model: nn.Module, name: str, truncate_size: int) -> list[Any]:
    if tp_size() > 1 or pp_size() > 1:
        raise NotImplementedError("get_weights_by_name with tp_size or pp_size > 1 is not built yet "
                                  "(each rank holds only its shard)")
    params = dict(model.named_parameters(remove_duplicate=False))
    if name == "lm_head.weight" and getattr(model, "tied", False):
        name = "model.embed_tokens.weight"  # a tied head is the embedding
    tensor = params.get(name)
    for fused, hf, shard in getattr(model, "stacked_params", ()):
        if tensor is None and f".{hf}." in name:
            fused_name = name.replace(f".{hf}.", f".{fused}.")
            if fused_name in params:
                module = model.get_submodule(fused_name.rsplit(".", 1)[0])
                tensor = params[fused_name].narrow(0, *_rows_of(module, shard))
    if tensor is None:
        raise ValueError(f"get_weights_by_name: the model has no weight named {name!r}")
    return tensor.detach()[:truncate_size].to("cpu", torch.float32).tolist()


def _rows_of(module: nn.Module, shard: Any) -> tuple[int, int]:
    """``(first row, rows)`` of one checkpoint tensor inside a fused weight."""
    if shard in ("q", "k", "v"):
        q, kv = module.q_size, module.kv_size
        return {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard]
    sizes = module.out_sizes
    return sum(sizes[:shard]), sizes[shard]
