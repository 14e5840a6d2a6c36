"""``get_weights_by_name``: a checkpoint tensor read back out of the running model, by its Hugging
Face name, as SGLang returns it (the first ``truncate_size`` rows as float32 lists). RL frameworks
use it to check that an update arrived. The model keeps some tensors fused (``q_proj`` / ``k_proj``
/ ``v_proj`` in ``qkv_proj``, ``gate_proj`` / ``up_proj`` in ``gate_up_proj``): those are sliced
back out.

With ``tp_size`` or ``pp_size`` > 1 no rank holds a whole tensor. Each rank then finds which
checkpoint elements its shard holds by running the parameter's own weight loader on index
tensors (row ids and column ids of the checkpoint shape, expanded views: no memory of the
full size), and the requested rows are summed across the ranks (replicated KV heads counted
once). The checkpoint shape comes from transformers' model of the config on the meta device."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from treadle.gpu_worker.distributed import pp_size, tp_size


def weights_by_name(model: nn.Module, name: str, truncate_size: int, model_config: Any = None) -> dict[str, Any]:
    """``{"weights": rows}``, or ``{"error": ..., "kind": "value" | "not_implemented"}`` for the
    client to raise as the matching exception (a control call's own failure is a RuntimeError)."""
    try:
        if tp_size() > 1 or pp_size() > 1:
            return {"weights": _gathered(model, name, truncate_size, model_config)}
        return {"weights": _read(model, name, truncate_size)}
    except ValueError as e:
        return {"error": str(e), "kind": "value"}
    except NotImplementedError as e:
        return {"error": str(e), "kind": "not_implemented"}


def _read(model: nn.Module, name: str, truncate_size: int) -> list[Any]:
    params = dict(model.named_parameters(remove_duplicate=False))
    target, shard = _target(model, params, name)
    if target is None:
        raise ValueError(f"get_weights_by_name: the model has no weight named {name!r}")
    tensor = params[target]
    if shard is not None:
        tensor = tensor.narrow(0, *_rows_of(model.get_submodule(target.rsplit(".", 1)[0]), shard))
    return tensor.detach()[:truncate_size].to("cpu", torch.float32).tolist()


def _target(model: nn.Module, params: dict[str, nn.Parameter], name: str) -> tuple[Optional[str], Any]:
    """The parameter that holds checkpoint tensor ``name`` and, for a fused one, the shard id the
    weight loaders know it by (None: the whole parameter); ``(None, None)`` if this rank has none."""
    if name in params:
        return name, None
    if name == "lm_head.weight" and getattr(model, "tied", False):
        return ("model.embed_tokens.weight" if "model.embed_tokens.weight" in params else None), None
    for fused, hf, shard in getattr(model, "stacked_params", ()):
        if f".{hf}." in name:
            fused_name = name.replace(f".{hf}.", f".{fused}.")
            return (fused_name if fused_name in params else None), shard
    return None, None


def _rows_of(module: nn.Module, shard: Any) -> tuple[int, int]:
    """``(first row, rows)`` of one checkpoint tensor inside a fused weight."""
    if shard in ("q", "k", "v"):
        q, kv = module.q_size, module.kv_size
        return {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard]
    sizes = module.out_sizes
    return sum(sizes[:shard]), sizes[shard]


def _gathered(model: nn.Module, name: str, truncate_size: int, model_config: Any) -> list[Any]:
    """The first rows of a checkpoint tensor, put together from every rank's shard. Every rank
    runs this (the all-reduces), also one without the tensor (another pipeline stage's layer)."""
    shape = _checkpoint_shapes(model_config).get(name)
    if shape is None or len(shape) not in (1, 2):
        raise ValueError(f"get_weights_by_name: the model has no weight named {name!r}"
                         + (f" (a {len(shape)}-d tensor is not gathered)" if shape else ""))
    rows, cols = min(truncate_size, shape[0]), (shape[1] if len(shape) == 2 else 1)
    device = next(model.parameters()).device
    total = torch.zeros(rows, cols, dtype=torch.float64, device=device)
    count = torch.zeros(rows, cols, dtype=torch.float64, device=device)
    found = _local_part(model, name, shape)
    if found is not None:
        values, row_ids, col_ids = found
        keep = (row_ids > 0) & (row_ids <= rows)  # 0: an element that is not the checkpoint's (padding)
        at = (row_ids[keep].long() - 1, col_ids[keep].long())
        total.index_put_(at, values[keep].double(), accumulate=True)
        count.index_put_(at, torch.ones_like(total[at]), accumulate=True)
    dist.all_reduce(total)
    dist.all_reduce(count)
    if bool((count == 0).any()):
        raise ValueError(f"get_weights_by_name: no rank holds all of {name!r}")
    out = (total / count).float().cpu()
    return (out if len(shape) == 2 else out[:, 0]).tolist()


def _local_part(model: nn.Module, name: str, shape: tuple[int, ...]
                ) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """This rank's values of checkpoint tensor ``name`` with their (1-based) row and column ids,
    found by loading index tensors through the parameter's weight loader; None if it has none."""
    params = dict(model.named_parameters(remove_duplicate=False))
    target, shard = _target(model, params, name)
    if target is None:
        return None
    param = params[target]
    loader = getattr(param, "weight_loader", None)
    rows, cols = shape[0], (shape[1] if len(shape) == 2 else 1)
    row_full = torch.arange(1, rows + 1, dtype=torch.int32).view(-1, *([1] if len(shape) == 2 else []))
    col_full = torch.arange(cols, dtype=torch.int32).view(1, -1) if len(shape) == 2 else torch.zeros(rows, dtype=torch.int32)
    ids = []
    for full in (row_full.expand(shape), col_full.expand(shape)):
        probe = nn.Parameter(torch.zeros(param.shape, dtype=torch.int32, device=param.device), requires_grad=False)
        if loader is None:
            probe.data.copy_(full)
        else:
            loader(probe, full.to(param.device), shard)
        ids.append(probe.data)
    values = param.detach()
    if values.dim() == 1:
        ids = [i.view(-1, 1) for i in ids]
        values = values.view(-1, 1)
    return values, ids[0], ids[1]


_SHAPES: dict[int, dict[str, tuple[int, ...]]] = {}  # id(model config) -> checkpoint shapes


def _checkpoint_shapes(model_config: Any) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor's shape, from transformers' own model of the config (meta device)."""
    if model_config is None:
        raise NotImplementedError("get_weights_by_name across ranks needs the model's config")
    if id(model_config) not in _SHAPES:
        import transformers

        from treadle.runtime.config_snapshot import transformers_config

        real = transformers_config(model_config)
        with torch.device("meta"):
            try:
                hf = transformers.AutoModelForCausalLM.from_config(real)
            except ValueError:  # no causal-LM class (an encoder)
                hf = transformers.AutoModel.from_config(real)
        _SHAPES[id(model_config)] = {n: tuple(p.shape) for n, p in hf.named_parameters(remove_duplicate=False)}
    return _SHAPES[id(model_config)]
