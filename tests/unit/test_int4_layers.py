"""4-bit (AWQ / GPTQ) weights: the format parsing and dequantization against the reference packers
(tests/int4_pack.py), and the packed layers (quant/int4_linear.py) of every tensor-parallel
rank against dense layers loaded with the dequantized weights, on the CPU (the layers' product
falls back to dequantize-then-matmul there; the Triton kernels are tested in test_triton_int4)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from int4_pack import awq_quantize, gptq_quantize
from treadle.gpu_worker import distributed
from treadle.gpu_worker.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
                                              quantized_layers)
from treadle.gpu_worker.loader import init_dummy_weights
from treadle.gpu_worker.quant.int4_format import (Int4Config, dequantize_parts, dequantized, int4_config,
                                                  pack_kmajor, pack_rows, unpack_kmajor, unpack_rows)
from treadle.gpu_worker.quant.int4_linear import Int4Method, finish_int4
from treadle.runtime.hf_config import check_quantization

GPTQ = [  # (group, sym, desc_act, v2)
    (32, True, False, False), (64, False, False, False), (32, False, True, False), (128, True, True, True),
    (-1, False, False, True)]


def _gptq_cfg(group, desc_act, v2):
    return Int4Config("gptq", group, desc_act, 0 if v2 else 1)


def test_pack_rows_round_trips_and_matches_the_gptq_packing():
    codes = torch.randint(0, 16, (64, 24), dtype=torch.uint8)
    assert torch.equal(unpack_rows(pack_rows(codes)), codes)
    w = torch.randn(24, 64)
    qweight = gptq_quantize(w, 32)[0]
    assert torch.equal(pack_rows(unpack_rows(qweight)), qweight)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_rows(codes[:60])


def test_kmajor_packing_puts_32_inputs_in_each_4_word_block():
    """The GPU kernels' layout: word ``4b + j`` of an output holds input ``32b + 4i + j`` in
    nibble ``i`` (chunked packing gives the same words)."""
    codes = torch.randint(0, 16, (96, 10), dtype=torch.uint8)
    words = pack_kmajor(codes, rows_at_once=3)
    assert words.shape == (10, 12) and torch.equal(words, pack_kmajor(codes))
    assert torch.equal(unpack_kmajor(words), codes)
    for n, b, i, j in [(0, 0, 0, 0), (3, 2, 5, 1), (9, 1, 7, 3)]:
        assert (int(words[n, 4 * b + j]) >> (4 * i)) & 0xF == int(codes[32 * b + 4 * i + j, n])
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_kmajor(codes[:48])


def test_unpacking_stays_on_the_words_device():
    """The GPU unpacks checkpoint parts where they land: no step may mix in a CPU tensor (meta
    tensors refuse one as a CUDA tensor would)."""
    from treadle.gpu_worker.quant.int4_format import logical

    for cfg in (Int4Config("awq", 32), Int4Config("gptq", 32, True, 1)):
        words = torch.empty(16, 8, dtype=torch.int32, device="meta")
        for part in cfg.parts:
            assert logical(cfg, part, words).device.type == "meta"
        assert pack_rows(unpack_rows(words)).device.type == "meta"


@pytest.mark.parametrize("group", [32, 64, 128])
def test_awq_dequantizes_to_the_reference(group):
    w = torch.randn(48, 256)
    qweight, qzeros, scales, want = awq_quantize(w, group)
    got = dequantize_parts(Int4Config("awq", group), {"qweight": qweight, "qzeros": qzeros, "scales": scales})
    assert torch.equal(got, want)


@pytest.mark.parametrize("group,sym,desc_act,v2", GPTQ)
def test_gptq_dequantizes_to_the_reference(group, sym, desc_act, v2):
    torch.manual_seed(1)
    w = torch.randn(48, 256)
    qweight, qzeros, scales, g_idx, want = gptq_quantize(w, group, sym, desc_act, v2)
    cfg = _gptq_cfg(group, desc_act, v2)
    got = dequantize_parts(cfg, {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx})
    assert torch.equal(got, want)
    assert (got - w).abs().max() < 0.6 * scales.float().max() * (2 if sym else 1)  # a 4-bit picture of w
    # the CPU's loading stream: parts in any order, g_idx skipped without desc_act
    stream = [("m.g_idx", g_idx), ("m.scales", scales), ("other", w), ("m.qzeros", qzeros), ("m.qweight", qweight)]
    out = dict(dequantized(iter(stream), cfg))
    assert set(out) == {"other", "m.weight"} and torch.equal(out["m.weight"], want)


def test_configs_and_checks(tmp_path):
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": True, "sym": False}
    assert int4_config({"quantization_config": gptq}) == Int4Config("gptq", 64, True, 1)
    assert int4_config({"quantization_config": {**gptq, "checkpoint_format": "gptq_v2"}}).zero_offset == 0
    assert int4_config({"quantization_config": {"quant_method": "awq", "group_size": 32}}) == Int4Config("awq", 32)
    assert int4_config({}) is None and int4_config({}, "awq") == Int4Config("awq", 128)
    assert int4_config({}, "gptq") == Int4Config("gptq", 128, False, 1)
    with pytest.raises(NotImplementedError, match="bits=8"):
        int4_config({"quantization_config": {**gptq, "bits": 8}})
    with pytest.raises(NotImplementedError, match="marlin"):
        int4_config({"quantization_config": {**gptq, "checkpoint_format": "marlin"}})
    (tmp_path / "config.json").write_text('{"quantization_config": {"quant_method": "gptq", "bits": 4}}')
    check_quantization(str(tmp_path), "gptq")
    check_quantization(str(tmp_path), None)
    with pytest.raises(ValueError, match="not an AWQ checkpoint"):
        check_quantization(str(tmp_path), "awq")
    with pytest.raises(ValueError, match="is a GPTQ checkpoint"):
        check_quantization(str(tmp_path), "gguf")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not a GPTQ checkpoint"):
        check_quantization(str(tmp_path), "gptq")
    check_quantization(str(tmp_path), "gptq", load_format="dummy")  # random packed weights: allowed


@pytest.fixture
def tp(monkeypatch):
    def set_tp(rank: int, size: int) -> None:
        monkeypatch.setattr(distributed, "_TP_RANK", rank)
        monkeypatch.setattr(distributed, "_TP_SIZE", size)
    return set_tp


def _quantize(cfg, w, seed):
    if cfg.method == "awq":
        qw, qz, sc, deq = awq_quantize(w, cfg.group_size)
        return {"qweight": qw, "qzeros": qz, "scales": sc}, deq
    qw, qz, sc, g_idx, deq = gptq_quantize(w, cfg.group_size, False, cfg.desc_act, not cfg.zero_offset, seed)
    return {"qweight": qw, "qzeros": qz, "scales": sc, "g_idx": g_idx}, deq


def _load(layer, parts, shard=None):
    for name, t in parts.items():
        if name in dict(layer.named_parameters()):
            getattr(layer, name).weight_loader(getattr(layer, name), t, shard)


def _layers(make, cfg, shards):
    """A 4-bit layer and a dense one, each loaded with ``shards`` [(shard_id, parts, dequantized)]."""
    with quantized_layers(Int4Method(cfg)):
        q = make()
    dense = make()
    for sid, parts, deq in shards:
        _load(q, parts, sid)
        dense.weight.weight_loader(dense.weight, deq, sid)
    finish_int4(q)
    return q, dense


CFGS = [Int4Config("awq", 32), Int4Config("gptq", 32, False, 1), Int4Config("gptq", 32, True, 0)]


@pytest.mark.parametrize("cfg", CFGS, ids=["awq", "gptq", "gptq-desc_act"])
@pytest.mark.parametrize("tp_size", [1, 2])
def test_packed_layers_match_dense_ones_on_every_rank(cfg, tp_size, tp):
    torch.manual_seed(0)
    hidden, heads, kv_heads, hd, inter = 128, 4, 2, 32, 256
    x = torch.randn(5, hidden)
    # (the desc_act order follows the input: the same for q/k/v and for gate/up)
    full = {n: _quantize(cfg, torch.randn(*shape) * 0.1, seed) for n, shape, seed in
            [("q", (heads * hd, hidden), 0), ("k", (kv_heads * hd, hidden), 0), ("v", (kv_heads * hd, hidden), 0),
             ("gate", (inter, hidden), 1), ("up", (inter, hidden), 1), ("down", (hidden, inter), 2)]}
    for rank in range(tp_size):
        tp(rank, tp_size)
        checks = [
            _layers(lambda: QKVParallelLinear(hidden, hd, heads, kv_heads), cfg,
                    [(s, *full[s]) for s in "qkv"]),
            _layers(lambda: MergedColumnParallelLinear(hidden, [inter, inter]), cfg,
                    [(0, *full["gate"]), (1, *full["up"])]),
        ]
        if rank == 0:  # Phi-3's fused checkpoint tensors: [q | k | v] and [gate | up] in one part
            qkv = _quantize(cfg, torch.cat([full[s][1] for s in "qkv"]), 0)
            gate_up = _quantize(cfg, torch.cat([full["gate"][1], full["up"][1]]), 1)
            checks += [_layers(lambda: QKVParallelLinear(hidden, hd, heads, kv_heads), cfg, [(None, *qkv)]),
                       _layers(lambda: MergedColumnParallelLinear(hidden, [inter, inter]), cfg, [(None, *gate_up)])]
        if not (cfg.desc_act and tp_size > 1):  # (desc_act row splits: test_straddling_groups_are_refused)
            checks.append(_layers(lambda: RowParallelLinear(inter, hidden), cfg, [(None, *full["down"])]))
        for q, dense in checks:
            xin = x if not isinstance(q, RowParallelLinear) else torch.randn(5, q.in_size)
            want = F.linear(xin, dense.weight)
            torch.testing.assert_close(q.quant.apply(q, xin, None), want, atol=1e-5, rtol=1e-5)
            assert q.qweight.dtype == torch.int32 and q.qweight.numel() * 8 == dense.weight.numel()
            assert "g_idx" not in dict(q.named_parameters())


def test_straddling_groups_are_refused(tp):
    tp(1, 2)
    with quantized_layers(Int4Method(Int4Config("gptq", 64, False, 1))):
        with pytest.raises(ValueError, match="straddle"):
            RowParallelLinear(192, 64)  # 96 inputs a rank: the second rank starts inside group 1
    cfg = Int4Config("gptq", 32, True, 1)  # desc_act: a random order mixes every group into both halves
    parts, _ = _quantize(cfg, torch.randn(64, 256), 0)
    with quantized_layers(Int4Method(cfg)):
        layer = RowParallelLinear(256, 64)
    _load(layer, parts)
    with pytest.raises(ValueError, match="straddle"):
        finish_int4(layer)
    tp(0, 1)
    with quantized_layers(Int4Method(cfg)):
        layer = MergedColumnParallelLinear(256, [64, 64])
    _load(layer, parts, 0)
    with pytest.raises(ValueError, match="different g_idx"):
        _load(layer, _quantize(cfg, torch.randn(64, 256), 1)[0], 1)


def test_symmetric_zeros_are_dropped_and_dummy_weights_are_packed():
    cfg = Int4Config("gptq", 32, False, 1)
    parts, deq = _quantize(cfg, torch.randn(64, 128), 0)
    parts["qzeros"] = gptq_quantize(torch.randn(64, 128), 32, sym=True)[1]  # all stored 7: real zeros 8
    with quantized_layers(Int4Method(cfg)):
        layer = MergedColumnParallelLinear(128, [32, 32])
    _load(layer, parts)
    finish_int4(layer)
    assert layer.qzeros is None and "qzeros" not in dict(layer.named_parameters())
    with quantized_layers(Int4Method(Int4Config("awq", 128))):
        model = torch.nn.Sequential(RowParallelLinear(256, 64), torch.nn.LayerNorm(64))
    init_dummy_weights(model, seed=0, std=0.02)
    finish_int4(model)
    w = model[0].quant.weight(model[0])
    assert w.shape == (64, 256) and 0.01 < w.std() < 0.04
    assert {n: p.dtype for n, p in model[0].named_parameters()} == {
        "qweight": torch.int32, "qzeros": torch.uint8, "scales": torch.float16}  # AWQ's zero points: kept
    assert set(model[0].qzeros.unique().tolist()) == {7, 8, 9}


@pytest.mark.parametrize("quant", [{"quant_method": "awq", "bits": 4, "group_size": 32},
                                   {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True,
                                    "sym": False}], ids=["awq", "gptq-desc_act"])
def test_a_whole_checkpoint_loads_packed_by_name(quant, tmp_path):
    """A Llama checkpoint through the model's own ``load_weights`` (HF names, fused q/k/v and
    gate/up) into packed layers: each layer's weight equals the dense model's (the CPU's load)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from treadle.gpu_worker.model_loader import build_model, load_weights
    from treadle.gpu_worker.models.registry import get_model_class

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf, tensors = LlamaForCausalLM(cfg), {}
    for name, p in hf.named_parameters():
        if not name.endswith("proj.weight"):
            tensors[name] = p.data
            continue
        base = name[:-len(".weight")]
        if quant["quant_method"] == "awq":
            parts = dict(zip(("qweight", "qzeros", "scales"), awq_quantize(p.data, 32)[:3]))
        else:  # one act order per input: q/k/v share it, gate/up share it
            seed = 2 * int(name.split(".")[2]) + ("mlp" in name) + 7 * name.endswith(("o_proj.weight", "down_proj.weight"))
            parts = dict(zip(("qweight", "qzeros", "scales", "g_idx"), gptq_quantize(p.data, 32, False, True, seed=seed)[:4]))
        tensors.update({f"{base}.{k}": v for k, v in parts.items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    cfg.quantization_config = quant
    dense = build_model(cfg, torch.float32, torch.device("cpu"), 64)  # the CPU: dequantized at load
    load_weights(dense, str(tmp_path), "auto", cfg, 0, 0.0)
    with quantized_layers(Int4Method(int4_config(cfg))):
        packed = get_model_class(cfg)(cfg, max_positions=64)
    load_weights(packed, str(tmp_path), "auto", cfg, 0, 0.0)
    layers = {n: m for n, m in packed.named_modules() if getattr(m, "quant", None) is not None}
    assert len(layers) == 8
    dense_mods = dict(dense.named_modules())
    for name, m in layers.items():
        want = dense_mods[name].weight
        if m.int4_perm is not None:
            want = want[:, m.int4_perm.long()]
        torch.testing.assert_close(m.quant.weight(m), want, atol=0, rtol=0)
