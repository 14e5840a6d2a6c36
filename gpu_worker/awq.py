"""AWQ checkpoints (AutoAWQ's 4-bit "gemm" layout), dequantized while they load.

An AWQ linear layer is stored as three tensors instead of ``weight``: ``qweight`` ``[in, out/8]``
int32 (eight 4-bit values a word), ``qzeros`` ``[in/group, out/8]`` (the same packing) and
``scales`` ``[in/group, out]``. Word column ``c`` holds output columns ``8c .. 8c+7``, nibble ``i``
(bits ``4i .. 4i+3``) holding column ``8c + AWQ_ORDER[i]``. The weight is
``(q - z) * s`` per input group, transposed to the ``[out, in]`` of a linear layer.

On the CPU the model runs on the dequantized weights in its own dtype; on CUDA the weights stay
packed (``quant/int4_linear.py``, which reads AWQ's packing with ``unpack``).
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch

from treadle.runtime.hf_config import awq_params

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_UNPACK = torch.tensor([AWQ_ORDER.index(i) for i in range(8)])  # nibble that holds column 8c + i
_PARTS = ("qweight", "qzeros", "scales")


def awq_config(config: Any) -> Optional[dict[str, Any]]:
    """The checkpoint's AWQ settings (``runtime.hf_config.awq_params``) from an HF config object or
    a dict; None when the checkpoint is not AWQ."""
    q = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    if q is None and not isinstance(config, dict) and getattr(config, "text_config", None) is not None:
        q = getattr(config.text_config, "quantization_config", None)
    return awq_params(q)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """``[r, c]`` int32 words -> ``[r, 8c]`` values 0..15 in logical column order."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nibbles = (packed.to(torch.int32)[:, :, None] >> shifts) & 0xF  # [r, c, 8], nibble i
    return nibbles[:, :, _UNPACK].reshape(packed.shape[0], -1)


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """The ``[out, in]`` float32 weight of one AWQ linear layer."""
    q, z = unpack(qweight), unpack(qzeros)
    in_features = q.shape[0]
    if in_features % group_size or z.shape[0] * group_size != in_features or tuple(scales.shape) != tuple(z.shape):
        raise ValueError(f"AWQ tensors do not fit together: qweight {tuple(qweight.shape)}, qzeros "
                         f"{tuple(qzeros.shape)}, scales {tuple(scales.shape)}, group_size {group_size}")
    groups = torch.arange(in_features) // group_size
    w = (q - z[groups]).to(torch.float32) * scales.to(torch.float32)[groups]
    return w.t().contiguous()


def dequantized(weights: Iterator[tuple[str, Any]], group_size: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass a checkpoint's tensors through, turning each layer's (qweight, qzeros, scales) into its
    ``weight`` as soon as all three have been read (they may come in any order)."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        prefix, _, part = name.rpartition(".")
        if part not in _PARTS:
            yield name, tensor
            continue
        parts = pending.setdefault(prefix, {})
        parts[part] = tensor[:]  # a lazy checkpoint tensor is read whole: dequantizing needs all of it
        if len(parts) == len(_PARTS):
            del pending[prefix]
            yield f"{prefix}.weight", dequantize(parts["qweight"], parts["qzeros"], parts["scales"], group_size)
    if pending:
        prefix, parts = next(iter(pending.items()))
        raise ValueError(f"AWQ layer {prefix!r} lacks {sorted(set(_PARTS) - set(parts))} in the checkpoint")


def keeps(keep: Any) -> Any:
    """A pipeline stage's tensor filter that also knows the AWQ parts of the weights it keeps."""
    if keep is None:
        return None

    def wants(name: str) -> bool:
        prefix, _, part = name.rpartition(".")
        return keep(f"{prefix}.weight" if part in _PARTS else name)
    return wants
