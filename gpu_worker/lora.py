"""LoRA adapters (PEFT format) served side by side: each token of a step may use a different one.

``y = W x + s * B (A x)`` for the attention and MLP projections of Llama-family models.
``LoRAPool`` keeps ``num_slots`` adapters resident in preallocated buffers per projection, each
padded to ``max_rank`` and sharded like the weight it adapts. The delta is computed densely over
all slots at once and masked per token: fixed shapes, no gathers, two matmuls per projection.
That costs ``num_slots * max_rank`` columns a token whether used or not, which is cheap for the
few slots and small ranks this serves (a grouped kernel can replace ``_ModuleLoRA.apply`` later).

Tensor parallelism follows the weights: column-parallel layers shard B along its rows (A full),
row-parallel layers shard A along its columns (B full) and add their delta to the partial sum
before the all-reduce, since ``sum_r (x_r A_r^T) B^T = (x A^T) B^T``.

With ``enable_deterministic_inference`` both matmuls are ``batch_invariant.linear`` (fixed tiles,
as the base layers): a token's delta then depends on its own input and adapter only, not on the
other tokens of the step or their adapters (theirs enter its sums as exact zeros of the mask).

Reading adapter files and keeping them in host memory: ``lora_adapter``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from treadle.gpu_worker.distributed import tp_rank, tp_size
from treadle.gpu_worker.layers import batch_invariant
from treadle.gpu_worker.lora_adapter import LoRAAdapter
from treadle.runtime.lora_args import LORA_TARGETS as TARGETS


@dataclass
class _Sub:
    """One HF projection inside a (possibly fused) layer, with this rank's slice of its LoRA buffers.

    ``a``: [S, R, in_local]; ``b``: [S, out_local, R], a view of ``b_all``'s storage [out_local, S, R]
    so the forward reads ``b_all`` as [out_local, S*R] without a copy.
    """

    hf: str
    out_off: int  # where this projection's columns start in the layer's (local) output
    full_in: int
    full_out: int
    in_start: int  # row-parallel: this rank's slice of A's columns; column-parallel: 0, all of them
    out_start: int  # column-parallel: this rank's slice of B's rows; row-parallel: 0, all of them
    a: torch.Tensor
    b_all: torch.Tensor

    @property
    def b(self) -> torch.Tensor:
        return self.b_all.permute(1, 0, 2)


class _ModuleLoRA:
    """What ``LoRAPool`` attaches to an adapted layer as ``module.lora``; the layer calls ``apply``."""

    def __init__(self, pool: "LoRAPool", layer: int, subs: list[_Sub]):
        self.pool, self.layer, self.subs = pool, layer, subs

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` plus every sub-projection's masked delta, in place (``y`` is the layer's fresh output)."""
        mask = self.pool.mask
        if mask is None:
            return y
        s_r = mask.shape[1]
        for sub in self.subs:
            n = sub.b_all.shape[0]
            a, b = sub.a.view(s_r, -1), sub.b_all.view(n, s_r)
            if batch_invariant.ENABLED:  # a row's sums in a fixed order, whatever the batch
                delta = batch_invariant.linear(batch_invariant.linear(x, a) * mask, b)
            else:
                delta = (x @ a.t() * mask) @ b.t()
            y[..., sub.out_off:sub.out_off + n] += delta
        return y


def _subs_of(name: str, module: nn.Module, mods: dict[str, nn.Module]) -> list[tuple]:
    """(hf, out_off, out_local, full_in, full_out, in_start, out_start) of each projection in ``module``."""
    tp, rank, in_local = tp_size(), tp_rank(), module.in_size  # (a 4-bit layer has no dense weight)
    parent, kind = name.rsplit(".", 1)
    if kind == "qkv_proj":
        q, kv, (fq, fk, fv) = module.q_size, module.kv_size, module.full_sizes
        return [("q_proj", 0, q, in_local, fq, 0, module.q_start),
                ("k_proj", q, kv, in_local, fk, 0, module.kv_start),
                ("v_proj", q + kv, kv, in_local, fv, 0, module.kv_start)]
    if kind == "gate_up_proj":
        out = []
        for i, hf in enumerate(("gate_proj", "up_proj")):
            n = module.out_sizes[i] // tp
            out.append((hf, sum(module.out_sizes[:i]) // tp, n, in_local, module.out_sizes[i], 0, rank * n))
        return out
    # Row-parallel: the full input size is what the sibling column-parallel layer produces in all.
    sib = mods.get(parent + (".qkv_proj" if kind == "o_proj" else ".gate_up_proj"))
    full_in = in_local * tp if sib is None else (sib.full_sizes[0] if kind == "o_proj" else sib.out_sizes[0])
    out = module.out_size
    return [(kind, 0, out, full_in, out, module.in_start, 0)]


class LoRAPool:
    """``num_slots`` resident adapters over a model's Llama projections; see the module docstring.

    Per step: ``set_token_slots`` (one slot a token, -1 for the base model), then the forward.
    """

    MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")

    def __init__(self, model: nn.Module, num_slots: int, max_rank: int, device: Union[str, torch.device],
                 dtype: torch.dtype, targets: Optional[tuple[str, ...]] = None):
        """``targets``: the HF projections (of ``TARGETS``) that get device buffers; None: all of them.
        Adapters that touch others are refused at ``check``."""
        if num_slots <= 0 or max_rank <= 0:
            raise ValueError(f"num_slots ({num_slots}) and max_rank ({max_rank}) must be positive")
        self.num_slots, self.max_rank = num_slots, max_rank
        self.targets = tuple(TARGETS if targets is None else targets)
        self.device, self.dtype = torch.device(device), dtype
        config = getattr(model, "config", None)
        config = getattr(config, "text_config", None) or config  # LLaVA: the language model's layers
        self.num_layers: Optional[int] = getattr(config, "num_hidden_layers", None)
        self.scalings = torch.zeros(num_slots, dtype=torch.float32, device=self.device)
        self.token_slots: Optional[torch.Tensor] = None
        self.mask: Optional[torch.Tensor] = None  # [T, S*R] in dtype; None: no token uses an adapter
        self.subs: dict[tuple[int, str], _Sub] = {}  # (layer, hf module) -> its buffers
        mods = dict(model.named_modules())
        for name, module in mods.items():
            m = re.search(r"(?:^|\.)layers\.(\d+)\.(?:[\w.]+\.)?(\w+)$", name)
            if m is None or m.group(2) not in self.MODULES:
                continue
            layer, subs = int(m.group(1)), []
            for hf, off, n, full_in, full_out, in_start, out_start in _subs_of(name, module, mods):
                if hf not in self.targets:
                    continue
                a = torch.zeros(num_slots, max_rank, module.in_size, dtype=dtype, device=self.device)
                b_all = torch.zeros(n, num_slots, max_rank, dtype=dtype, device=self.device)
                sub = _Sub(hf, off, full_in, full_out, in_start, out_start, a, b_all)
                self.subs[(layer, hf)] = sub
                subs.append(sub)
            if subs:
                module.lora = _ModuleLoRA(self, layer, subs)
        self.layers = {layer for layer, _ in self.subs}  # this pipeline stage's
        if not self.subs:
            raise ValueError(f"{type(model).__name__} has none of the LoRA target modules {self.targets}")

    def check(self, adapter: LoRAAdapter) -> None:
        """Raise ``ValueError`` (naming the module) if ``adapter`` does not fit this model and pool."""
        if adapter.rank > self.max_rank:
            raise ValueError(f"LoRA adapter {adapter.path}: rank {adapter.rank} exceeds max_rank {self.max_rank}")
        for (layer, hf), (a, b) in adapter.weights.items():
            if self.num_layers is not None and not 0 <= layer < self.num_layers:
                raise ValueError(f"LoRA adapter {adapter.path}: layer {layer} out of range "
                                 f"(the model has {self.num_layers})")
            sub = self.subs.get((layer, hf))
            if sub is None and hf not in self.targets:
                raise ValueError(f"LoRA adapter {adapter.path}: it adapts {hf}, which is not among the engine's "
                                 f"lora_target_modules {list(self.targets)}")
            if sub is None:
                if layer in self.layers:  # else another pipeline stage's layer
                    raise ValueError(f"LoRA adapter {adapter.path}: layer {layer} {hf} has no place in the model")
                continue
            want_a, want_b = (adapter.rank, sub.full_in), (sub.full_out, adapter.rank)
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise ValueError(f"LoRA adapter {adapter.path}: layer {layer} {hf} has A {tuple(a.shape)}, "
                                 f"B {tuple(b.shape)}; the model needs A {want_a}, B {want_b}")

    def load(self, slot: int, adapter: LoRAAdapter) -> None:
        """Put ``adapter`` into ``slot`` (replacing what was there), this rank's shard of it only."""
        self._check_slot(slot)
        self.check(adapter)
        self.clear(slot)
        r = adapter.rank
        for key, (a, b) in adapter.weights.items():
            sub = self.subs.get(key)
            if sub is None:
                continue
            n_in, n_out = sub.a.shape[2], sub.b_all.shape[0]
            sub.a[slot, :r].copy_(a[:, sub.in_start:sub.in_start + n_in])
            sub.b_all[:, slot, :r].copy_(b[sub.out_start:sub.out_start + n_out])
        self.scalings[slot] = adapter.scaling

    def clear(self, slot: int) -> None:
        """Empty ``slot``: tokens still pointing at it get the base model's output."""
        self._check_slot(slot)
        for sub in self.subs.values():
            sub.a[slot].zero_()
            sub.b_all[:, slot].zero_()
        self.scalings[slot] = 0.0

    def set_token_slots(self, slots: Optional[torch.Tensor]) -> None:
        """The adapter slot of every token of the next forward (int [T], in row order; -1: base model).

        Builds the step's mask once for every layer. Pass a CPU tensor to spare a device sync:
        the all-base check then runs on the host.
        """
        if slots is None or slots.numel() == 0 or not bool((slots >= 0).any()):
            self.token_slots, self.mask = None, None
            return
        if bool((slots >= self.num_slots).any()):
            raise ValueError(f"token slot {int(slots.max())} out of range (num_slots {self.num_slots})")
        slots = slots.to(self.device, torch.int64, non_blocking=True)
        onehot = slots[:, None] == torch.arange(self.num_slots, device=self.device)
        per_slot = (onehot * self.scalings).to(self.dtype)  # [T, S]: the token's scaling in its slot's column
        self.token_slots, self.mask = slots, per_slot.repeat_interleave(self.max_rank, dim=1)

    def graph_buffers(self, max_bs: int) -> torch.Tensor:
        """The static per-token slot buffer a CUDA graph reads (``graph_mask``); -1 everywhere."""
        self.static_slots = torch.full((max_bs,), -1, dtype=torch.int64, device=self.device)
        return self.static_slots

    def graph_mask(self, bs: int) -> None:
        """``set_token_slots`` for a captured decode step: the mask of the first ``bs`` static slots,
        made of device ops only (no host check, no shortcut for all-base batches), so a graph that
        captures it recomputes it from whatever the buffer holds at replay."""
        slots = self.static_slots[:bs]
        onehot = slots[:, None] == torch.arange(self.num_slots, device=self.device)
        self.token_slots = slots
        self.mask = (onehot * self.scalings).to(self.dtype).repeat_interleave(self.max_rank, dim=1)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} out of range (num_slots {self.num_slots})")
