"""enable_deterministic_inference beyond the dense layers: a token's LoRA delta (gpu_worker/lora.py)
and its mixture-of-experts output (gpu_worker/layers/moe.py, the torch path) bit-identical alone and
among other tokens that use other adapters (or none) and other experts; and close to the plain ops."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from treadle.gpu_worker.layers import batch_invariant as bi
from treadle.gpu_worker.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from treadle.gpu_worker.lora import LoRAPool
from treadle.gpu_worker.lora_adapter import LoRAAdapter

HIDDEN, INTER = 64, 96
SIZES = (2, 3, 7, 17, 40, 64)  # batch sizes the row is placed among (MKL's kernel choice changes with M)


@pytest.fixture
def mode(monkeypatch):
    monkeypatch.setattr(bi, "ENABLED", True)


def _in_batches(fn, row: torch.Tensor, rng: random.Random, draw) -> list[torch.Tensor]:
    """``fn(x, tags)`` of batches of random rows (each tagged by ``draw()``) holding ``row`` (tag
    ``draw(mine=True)``) at a random place; that row's result. The first run is the row alone."""
    outs = [fn(row[None], [draw(mine=True)])[0]]
    for m in SIZES:
        x = torch.randn(m, row.shape[0]) * row.abs().mean()
        tags = [draw() for _ in range(m)]
        at = rng.randrange(m)
        x[at], tags[at] = row, draw(mine=True)
        outs.append(fn(x, tags)[at])
    return outs


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(HIDDEN, 16, 4, 2)
        self.o_proj = RowParallelLinear(HIDDEN, HIDDEN)
        self.gate_up_proj = MergedColumnParallelLinear(HIDDEN, [INTER, INTER])
        self.down_proj = RowParallelLinear(INTER, HIDDEN)


def _lora_model():
    torch.manual_seed(0)
    model = nn.Module()
    model.layers = nn.ModuleList([_Layer()])
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    pool = LoRAPool(model, num_slots=3, max_rank=8, device="cpu", dtype=torch.float32)
    full = {"q_proj": (HIDDEN, 64), "k_proj": (HIDDEN, 32), "v_proj": (HIDDEN, 32), "o_proj": (HIDDEN, HIDDEN),
            "gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER), "down_proj": (INTER, HIDDEN)}
    adapters = []
    for slot, rank in enumerate((8, 4, 8)):
        w = {(0, hf): (torch.randn(rank, i) * 0.2, torch.randn(o, rank) * 0.2) for hf, (i, o) in full.items()}
        adapters.append(LoRAAdapter(rank, 2.0 / rank, w, path=f"adapter{slot}"))
        pool.load(slot, adapters[-1])
    return model.layers[0], pool, adapters


@pytest.mark.parametrize("slot", [0, 1, -1])
def test_lora_rows_are_batch_invariant(mode, slot: int) -> None:
    """Each projection of a row on adapter ``slot`` (-1: the base model) among rows on the other
    adapters, on none and on the same one: bit-identical to the row alone, and the delta PEFT's."""
    layer, pool, adapters = _lora_model()
    rng = random.Random(slot)

    def draw(mine: bool = False) -> int:
        return slot if mine else rng.choice([-1, 0, 1, 2])

    row = torch.randn(HIDDEN)
    for name in ("qkv_proj", "o_proj", "gate_up_proj"):
        module = getattr(layer, name)

        def run(x, tags):
            pool.set_token_slots(torch.tensor(tags))
            return module(x)

        outs = _in_batches(run, row, rng, draw)
        assert all(torch.equal(o, outs[0]) for o in outs), (name, slot)
        plain = row[None] @ module.weight.t()
        if slot >= 0:
            hf = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "o_proj": ["o_proj"],
                  "gate_up_proj": ["gate_proj", "up_proj"]}[name]
            a = adapters[slot]
            plain = plain + a.scaling * torch.cat([row[None] @ a.weights[(0, h)][0].t() @ a.weights[(0, h)][1].t()
                                                   for h in hf], dim=1)
        torch.testing.assert_close(outs[0], plain[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("renormalize,shared", [(True, 0), (False, 40)])  # Mixtral-like; Qwen2-MoE-like
def test_moe_rows_are_batch_invariant(monkeypatch, renormalize: bool, shared: int) -> None:
    """A token's routed (and shared) expert output among tokens routed anywhere: bit-identical to
    the token alone, and close to the plain torch path's."""
    from treadle.gpu_worker.layers.moe import SparseMoeBlock

    torch.manual_seed(1)
    block = SparseMoeBlock(HIDDEN, num_experts=6, top_k=2, intermediate=48, renormalize=renormalize,
                           shared_intermediate=shared)
    for p in block.parameters():
        p.data.normal_(0, 0.2)
    rows, rng = torch.randn(8, HIDDEN), random.Random(shared)
    plain = block(rows)
    monkeypatch.setattr(bi, "ENABLED", True)
    for row, want in zip(rows, plain):  # several: a last-bit difference shows for some rows only
        outs = _in_batches(lambda x, _: block(x), row, rng, lambda mine=False: None)
        assert all(torch.equal(o, outs[0]) for o in outs)
        torch.testing.assert_close(outs[0], want, rtol=1e-5, atol=1e-5)
