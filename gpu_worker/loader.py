"""Where weights come from: the safetensors files of an HF directory, or a seeded random init.

Checkpoint tensors are streamed one at a time (``safe_open`` maps the file; a tensor is read
only when asked for), so peak host memory is one tensor, not the model.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Callable, Iterator, Optional, Union

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm


def safetensors_files(model_dir: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    return files


class CheckpointTensor:
    """A checkpoint tensor not read yet. Weight loaders take their tensor-parallel shard with
    ``narrow`` (or a slice), which reads only those bytes from the file; ``t[:]`` reads it all."""

    def __init__(self, sl: Any) -> None:
        self._slice = sl
        self.shape = torch.Size(sl.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        idx = [slice(None)] * len(self.shape)
        idx[dim] = slice(start, start + length)
        return self._slice[tuple(idx)]

    def __getitem__(self, key: Any) -> torch.Tensor:
        return self._slice[key]

    def split(self, sizes: list[int], dim: int = 0) -> tuple[torch.Tensor, ...]:
        """A fused checkpoint tensor's parts (Phi-3's ``qkv_proj``/``gate_up_proj``), read whole."""
        return self[:].split(sizes, dim=dim)


def iter_safetensors(model_dir: str, progress: bool = True, keep: Optional[Callable[[str], bool]] = None,
                     lazy: bool = False) -> Iterator[tuple[str, Union[torch.Tensor, CheckpointTensor]]]:
    """Yield ``(hf_name, cpu_tensor)`` for every tensor of every file, lazily; with ``keep``, only
    the tensors it accepts (a pipeline stage never reads another stage's layers); with ``lazy``,
    ``CheckpointTensor``s, so each tensor-parallel rank reads only its slice."""
    files = safetensors_files(model_dir)
    total = 0
    for f in files:
        with safe_open(f, framework="pt", device="cpu") as fh:
            total += sum(1 for n in fh.keys() if keep is None or keep(n))
    with tqdm(total=total, desc="loading weights", unit="tensor", disable=None if progress else True) as bar:
        for f in files:
            with safe_open(f, framework="pt", device="cpu") as fh:
                for name in fh.keys():
                    if keep is None or keep(name):
                        yield name, CheckpointTensor(fh.get_slice(name)) if lazy else fh.get_tensor(name)
                        bar.update(1)


def default_weight_loader(param: nn.Parameter, full: torch.Tensor, shard_id=None) -> None:
    """For replicated params without a TP-aware loader (norm gains): a plain checked copy."""
    if param.shape != full.shape:
        raise ValueError(f"shape mismatch: param {tuple(param.shape)} vs checkpoint {tuple(full.shape)}")
    param.data.copy_(full[:])  # [:] reads a CheckpointTensor whole


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Random weights for benchmarks/tests without a checkpoint: N(0, std), norm gains 1.

    Drawn on the model's device from a generator seeded by ``seed``, in parameter order, so a
    given (config, seed, device) always yields the same model.
    """
    params = list(model.parameters())
    if not params:
        return
    gen = torch.Generator(device=params[0].device).manual_seed(seed)
    for name, p in model.named_parameters():  # deduplicated: tied weights drawn once
        if getattr(p, "dummy_init", None) is not None:  # a packed quantized part (quant/int4_linear.py)
            p.dummy_init(p, gen, std)
        elif p.dtype.itemsize == 1:  # FP8 weights cannot be drawn: gpu_worker/fp8.dummy_weights fills them
            continue
        elif p.dim() == 1 and name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, std, generator=gen)
