"""enable_deterministic_inference with quantized weights: a row of an FP8 or 4-bit (AWQ/GPTQ)
layer gives the same bits alone and inside batches of any size (their products go through the
batch-invariant matmul on the dequantized weight, on every device)."""

from __future__ import annotations

import random

import pytest
import torch

from int4_pack import awq_quantize, gptq_quantize
from treadle.gpu_worker.layers import batch_invariant as bi
from treadle.gpu_worker.layers.fp8_linear import Fp8Linear, quantize_groups, quantize_rows
from treadle.gpu_worker.layers.linear import RowParallelLinear, quantized_layers
from treadle.gpu_worker.quant.int4_format import Int4Config
from treadle.gpu_worker.quant.int4_linear import Int4Method, finish_int4

K, N = 256, 384
SIZES = (1, 2, 3, 7, 16, 17, 33, 64)


@pytest.fixture
def deterministic():
    bi.enable(True)
    yield
    bi.enable(False)


def rows_alone_and_batched(fn, row: torch.Tensor) -> list[torch.Tensor]:
    """``fn`` of batches of SIZES random rows holding ``row`` at a random place: that row's result."""
    rng, outs = random.Random(0), []
    for m in SIZES:
        x = torch.randn(m, row.shape[0])
        at = rng.randrange(m)
        x[at] = row
        outs.append(fn(x)[at])
    return outs


def int4_layer(method: str) -> RowParallelLinear:
    torch.manual_seed(0)
    w = torch.randn(N, K) * 0.05
    if method == "awq":
        cfg = Int4Config("awq", 32)
        qw, qz, sc, _ = awq_quantize(w, 32)
        parts = {"qweight": qw, "qzeros": qz, "scales": sc}
    else:
        cfg = Int4Config("gptq", 32, True, 1)
        qw, qz, sc, g_idx, _ = gptq_quantize(w, 32, False, True, False, 0)
        parts = {"qweight": qw, "qzeros": qz, "scales": sc, "g_idx": g_idx}
    with quantized_layers(Int4Method(cfg)):
        layer = RowParallelLinear(K, N)
    params = dict(layer.named_parameters())
    for name, t in parts.items():
        if name in params:
            params[name].weight_loader(params[name], t, None)
    finish_int4(layer)
    return layer


@pytest.mark.parametrize("method", ["awq", "gptq-desc_act"])
def test_int4_rows_are_batch_invariant(method, deterministic):
    layer = int4_layer(method)
    row = torch.randn(K)
    outs = rows_alone_and_batched(lambda x: layer.quant.apply(layer, x, None), row)
    assert all(torch.equal(o, outs[0]) for o in outs)
    bi.enable(False)  # the same numbers as the default path, to float tolerance
    torch.testing.assert_close(outs[0], layer.quant.apply(layer, row[None], None)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scales", ["per_channel", "block"])
def test_fp8_rows_are_batch_invariant(scales, deterministic):
    torch.manual_seed(1)
    w = torch.randn(N, K) * 0.05
    q, s = quantize_rows(w) if scales == "per_channel" else quantize_groups(w, 128)
    layer = Fp8Linear(q, s, 0 if scales == "per_channel" else 128)
    bias, row = torch.randn(N), torch.randn(K)
    outs = rows_alone_and_batched(lambda x: layer.product(x, bias), row)
    assert all(torch.equal(o, outs[0]) for o in outs)
    bi.enable(False)
    torch.testing.assert_close(outs[0], layer.product(row[None], bias)[0], rtol=1e-5, atol=1e-5)


def test_torchao_is_refused_in_the_mode():
    from treadle.runtime.server_args import ServerArgs

    with pytest.raises(ValueError, match="torchao_config='int8wo' cannot be combined with enable_deterministic"):
        ServerArgs(model_path="default", torchao_config="int8wo", enable_deterministic_inference=True)
    ServerArgs(model_path="default", quantization="awq", enable_deterministic_inference=True)  # 4-bit: served
