"""FP8 weights: the config forms, the loader against the reference packer (``tests/fp8_checkpoints.py``),
and the kernels against dequantize-then-matmul.

Loading runs in-process on the CPU (build + load, no engine): every linear layer must come out as
the packer's dequantized weight, bit for bit, for per-tensor, per-channel and block scales.
The Triton kernels run in the interpreter on the CPU (float32 activations: the interpreter's
bfloat16 dot is not usable) and, marked ``gpu``, on CUDA in bfloat16 for M from 1 to 4,096, with
the ``_scaled_mm`` path and a CUDA graph.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from kernel_helpers import interpret_script
from treadle.gpu_worker.layers.fp8_linear import SKINNY_MAX
from treadle.runtime.fp8_config import Fp8Scheme, fp8_params

# (M, N, K, scale form, bias); block forms use 32-wide blocks and K/N that are not multiples of them
KERNEL_CASES = [(1, 48, 96, "channel", False), (1, 40, 100, "block", True), (1, 64, 256, "channel", True),
                (1, 40, 128, "block", False), (3, 64, 128, "tensor", True),
                (5, 72, 96, "block", False), (17, 32, 64, "channel", False), (33, 48, 160, "block", True)]
GPU_MS = [1, 2, 3, 4, 8, 16, 17, 31, 64, 128, 300, 1024, 4096]


def test_fp8_params_reads_the_three_config_forms():
    assert fp8_params({"quant_method": "fp8", "activation_scheme": "static"}) == Fp8Scheme()
    assert fp8_params({"quant_method": "fp8", "weight_block_size": [128, 128], "ignored_layers": ["a"]}) == \
        Fp8Scheme((128, 128), ("a",))
    ct = {"quant_method": "compressed-tensors", "ignore": ["lm_head"],
          "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float", "strategy": "block",
                                              "block_structure": [128, 128]}}}}
    assert fp8_params(ct) == Fp8Scheme((128, 128), ("lm_head",))
    assert fp8_params({"quant_method": "awq"}) is None and fp8_params(None) is None
    ct["config_groups"]["g"]["weights"] = {"num_bits": 4, "type": "int", "strategy": "group"}
    with pytest.raises(NotImplementedError, match="8-bit float"):
        fp8_params(ct)
    with pytest.raises(NotImplementedError, match="e5m2"):
        fp8_params({"quant_method": "fp8", "fmt": "e5m2"})
    with pytest.raises(ValueError, match="weight_block_size"):
        fp8_params({"quant_method": "fp8", "weight_block_size": [128]})


def test_packer_is_a_close_fp8_picture():
    from fp8_checkpoints import fp8_pack

    w = torch.randn(70, 100, generator=torch.Generator().manual_seed(0))
    for form in ("tensor", "channel", "block"):
        q, s, deq = fp8_pack(w, form)
        assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
        assert ((deq - w).abs() <= w.abs() * 2**-3 + 1e-6).all(), form  # e4m3: 3 mantissa bits
    assert fp8_pack(w, "block")[1].shape == (3, 4)


def _checkpoint(tmp_path, tokenizer_dir: str, form: str, mixed: bool):
    """An FP8 checkpoint of ``form``; ``mixed``: with q_proj of layer 0 and up_proj of layer 1 left
    float by a rule while the rest of their fused layers is FP8 (``fp8_checkpoints.MIXED``)."""
    from fp8_checkpoints import MIXED, MIXED_RULES, make_fp8_model

    if not mixed:
        return make_fp8_model(str(tmp_path), tokenizer_dir, form)
    return make_fp8_model(str(tmp_path), tokenizer_dir, form, float_modules=MIXED, rules=MIXED_RULES[form])


@pytest.mark.parametrize("mixed", [False, True], ids=["fp8", "mixed"])
@pytest.mark.parametrize("form", ["tensor", "channel", "block"])
def test_loader_gives_the_packers_dequantized_weights(form, mixed, tmp_path, default_model_dir, caplog):
    """Also where a rule leaves part of a fused layer float: that layer runs in float, its FP8 parts
    dequantized with their own scales (before, their scales had no place: a KeyError)."""
    from treadle.gpu_worker.model_loader import build_model, load_weights
    from treadle.runtime.llava_layout import load_model_config

    hf = _checkpoint(tmp_path, default_model_dir, form, mixed)
    cfg = load_model_config(str(tmp_path))
    with caplog.at_level("INFO", logger="treadle.worker"):
        model = build_model(cfg, torch.float32, torch.device("cpu"), 64)
    layers = model.model.layers
    assert layers[1].self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn  # FP8 until loaded
    assert (layers[0].self_attn.qkv_proj.weight.dtype == torch.float32) == mixed
    assert (layers[1].mlp.gate_up_proj.weight.dtype == torch.float32) == mixed
    assert ("model.layers.1.mlp.gate_up_proj runs in float32: the checkpoint leaves up_proj unquantized and stores "
            "gate_proj in FP8" in caplog.text) == mixed
    load_weights(model, str(tmp_path), "auto", cfg, 0, 0.02)
    hf_w = dict(hf.named_parameters())
    for i in range(2):
        attn, mlp = model.model.layers[i].self_attn, model.model.layers[i].mlp
        want_qkv = torch.cat([hf_w[f"model.layers.{i}.self_attn.{p}_proj.weight"] for p in "qkv"])
        want_gu = torch.cat([hf_w[f"model.layers.{i}.mlp.{p}_proj.weight"] for p in ("gate", "up")])
        assert torch.equal(attn.qkv_proj.weight, want_qkv) and torch.equal(mlp.gate_up_proj.weight, want_gu)
        assert torch.equal(attn.o_proj.weight, hf_w[f"model.layers.{i}.self_attn.o_proj.weight"])
        assert torch.equal(mlp.down_proj.weight, hf_w[f"model.layers.{i}.mlp.down_proj.weight"])
        assert "quant" not in attn.qkv_proj.__dict__  # on the CPU it runs as a float layer


@pytest.mark.parametrize("mixed", [False, True], ids=["fp8", "mixed"])
@pytest.mark.parametrize("form", ["tensor", "channel", "block"])
def test_each_tensor_parallel_rank_gets_its_rows_of_the_scales(form, mixed, tmp_path, default_model_dir, monkeypatch):
    """tp_size=2 without processes (each rank's layout only; no collective runs while loading)."""
    from treadle.gpu_worker import distributed
    from treadle.gpu_worker.model_loader import build_model, load_weights
    from treadle.runtime.llava_layout import load_model_config

    hf = _checkpoint(tmp_path, default_model_dir, form, mixed)
    cfg = load_model_config(str(tmp_path))
    w = {n: p.data for n, p in hf.named_parameters()}
    monkeypatch.setattr(distributed, "_TP_SIZE", 2)
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "_TP_RANK", rank)
        model = build_model(cfg, torch.float32, torch.device("cpu"), 64)
        load_weights(model, str(tmp_path), "auto", cfg, 0, 0.02)
        q, kv, inter = slice(32 * rank, 32 * rank + 32), slice(16 * rank, 16 * rank + 16), slice(64 * rank, 64 * rank + 64)
        for i in range(2):
            attn, mlp = model.model.layers[i].self_attn, model.model.layers[i].mlp
            hf_attn, hf_mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
            assert torch.equal(attn.qkv_proj.weight, torch.cat([w[f"{hf_attn}.{p}_proj.weight"][q if p == "q" else kv]
                                                                for p in "qkv"]))
            assert torch.equal(attn.o_proj.weight, w[f"{hf_attn}.o_proj.weight"][:, q])
            assert torch.equal(mlp.gate_up_proj.weight, torch.cat([w[f"{hf_mlp}.{p}_proj.weight"][inter]
                                                                   for p in ("gate", "up")]))
            assert torch.equal(mlp.down_proj.weight, w[f"{hf_mlp}.down_proj.weight"][:, inter])


@torch.no_grad()
@pytest.mark.parametrize("form", ["tensor", "channel", "block"])
def test_mixed_fused_layers_give_transformers_greedy_tokens(form, tmp_path, default_model_dir):
    """A ``ModelRunner`` on the checkpoint with part of two fused layers left float (prompts
    prefilled and decoded together): transformers' greedy tokens and prefill logits on the
    dequantized weights (transformers keeps q/k/v and gate/up apart, each in its own format)."""
    from kernel_helpers import Alloc
    from treadle.gpu_worker.model_runner import ModelRunner, RunnerConfig
    from treadle.runtime.messages import ForwardPlan, NewSlot, PlanRow, SamplingSpec

    hf = _checkpoint(tmp_path, default_model_dir, form, True)
    runner = ModelRunner(RunnerConfig(model_dir=str(tmp_path), device="cpu", dtype="float32", kv_tokens=256,
                                      max_slots=4, context_len=128))
    prompts, alloc, steps = [[5, 17, 99, 3, 250], [7, 7, 8, 200, 11, 42]], Alloc(0, 256), 8
    new, out = [NewSlot(s, SamplingSpec(temperature=0.0)) for s in range(len(prompts))], [[] for _ in prompts]
    rows = [PlanRow(s, p, 0, alloc(len(p))) for s, p in enumerate(prompts)]
    logits = runner.forward_logits(ForwardPlan(step=0, new_slots=new, rows=rows))
    for step in range(steps):
        ids, _ = runner.forward(ForwardPlan(step=step, new_slots=new if step == 0 else [], rows=rows))
        for s, tok in enumerate(ids):
            out[s].append(tok)
        rows = [PlanRow(s, [out[s][-1]], len(p) + step, alloc(1)) for s, p in enumerate(prompts)]
    for s, p in enumerate(prompts):
        ids = torch.tensor([p])
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                           do_sample=False, pad_token_id=0)[0, len(p):]
        assert out[s] == want.tolist()
        torch.testing.assert_close(logits[s], hf(ids).logits[0, -1].float(), atol=1e-4, rtol=0)


def test_quantization_fp8_on_a_float_checkpoint_rounds_each_row(tmp_path, default_model_dir):
    from fp8_checkpoints import fp8_pack, save_model, tiny_llama
    from treadle.gpu_worker.model_loader import build_model, load_weights
    from treadle.runtime.llava_layout import load_model_config

    hf, tok = tiny_llama(default_model_dir)
    save_model(hf, tok, default_model_dir, str(tmp_path))
    cfg = load_model_config(str(tmp_path))
    model = build_model(cfg, torch.float32, torch.device("cpu"), 64, quantization="fp8")
    load_weights(model, str(tmp_path), "auto", cfg, 0, 0.02)
    want = fp8_pack(hf.model.layers[1].mlp.down_proj.weight.data, "channel")[2]
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, want)
    assert torch.equal(model.model.norm.weight, hf.model.norm.weight)  # only linear layers are quantized


def test_ignored_layers_stay_float(tmp_path, default_model_dir):
    from fp8_checkpoints import make_fp8_model
    from treadle.gpu_worker.model_loader import build_model
    from treadle.runtime.llava_layout import load_model_config

    make_fp8_model(str(tmp_path), default_model_dir, "tensor")
    cfg = load_model_config(str(tmp_path))
    cfg.quantization_config["ignored_layers"] = ["model.layers.1.self_attn.k_proj", "re:.*0\\.mlp\\.down_proj$"]
    model = build_model(cfg, torch.float32, torch.device("cpu"), 64)
    layers = model.model.layers
    qkv = layers[1].self_attn.qkv_proj  # k_proj float, q_proj/v_proj FP8: a float layer (FP8 parts dequantized)
    assert qkv.weight.dtype == torch.float32 and "quant" not in qkv.__dict__ and qkv.weight_scale.numel() == 0
    down = layers[0].mlp.down_proj
    assert down.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="leaves unquantized"):  # not copied without its scale
        down.weight.weight_loader(down.weight, torch.zeros(64, 128, dtype=torch.float8_e4m3fn))
    assert layers[0].self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn


def _weights(n: int, k: int, form: str, gen: torch.Generator, device: str):
    """An ``Fp8Linear`` of a random weight in ``form`` and its dequantized float32 weight."""
    from treadle.gpu_worker.layers.fp8_linear import Fp8Linear, dequantize
    from fp8_checkpoints import BLOCK, fp8_pack

    q, s, deq = fp8_pack(torch.randn(n, k, generator=gen) * 0.05, form)
    if form == "block":  # the layer keeps block scales repeated over their rows
        scale, group = s.repeat_interleave(BLOCK, 0)[:n].contiguous(), BLOCK
    else:
        scale, group = s.reshape(-1).expand(n).contiguous(), k
    assert torch.equal(dequantize(q, scale, group), deq)
    return Fp8Linear(q.to(device), scale.to(device), group), deq.to(device)


def run_cases(device: str, dtype: torch.dtype, cases: list) -> list[str]:
    from fp8_checkpoints import BLOCK, rounded_activations

    failures = []
    gen = torch.Generator().manual_seed(0)
    for m, n, k, form, has_bias in cases:
        layer, deq = _weights(n, k, form, gen, device)
        x = torch.randn(m, k, generator=gen).to(device, dtype)
        bias = torch.randn(n, generator=gen).to(device, dtype) if has_bias else None
        xr = x.float()
        if dtype != torch.float32 and m > SKINNY_MAX:  # the FP8 x FP8 paths round activations per token (group)
            xr = rounded_activations(xr, BLOCK if form == "block" else k)
        want = xr @ deq.T + (bias.float() if has_bias else 0)
        got = layer.product(x, bias).float()
        tol = 1e-2 * want.abs().max().item() + 1e-3 if dtype == torch.bfloat16 else 1e-4  # bf16 outputs
        err = (got - want).abs().max().item()
        if got.shape != (m, n) or not err <= tol:
            failures.append(f"M={m} N={n} K={k} {form} bias={has_bias}: max error {err:.3g} > {tol:.3g}")
    return failures


def run_fp8_x_fp8(device: str, dtype: torch.dtype) -> list[str]:
    """The GEMM's FP8 x FP8 form (block scales) on activations quantized per 32 columns by torch."""
    from fp8_checkpoints import BLOCK, rounded_activations
    from treadle.gpu_worker.layers.triton_fp8 import gemm

    failures, gen = [], torch.Generator().manual_seed(4)
    for m, n, k in ((20, 48, 96), (37, 40, 100)):
        layer, deq = _weights(n, k, "block", gen, device)
        x = torch.randn(m, k, generator=gen).to(device)
        kb = -(-k // BLOCK)
        xs = torch.nn.functional.pad(x, (0, kb * BLOCK - k)).reshape(m, kb, BLOCK).abs().amax(2) / 448
        xq = (x / xs.repeat_interleave(BLOCK, 1)[:, :k]).to(torch.float8_e4m3fn)
        want = rounded_activations(x, BLOCK) @ deq.T
        got = gemm(xq, layer.weight, layer.scales_2d, BLOCK, None, xs, dtype).float()
        err, tol = (got - want).abs().max().item(), 1e-4 if dtype == torch.float32 else 1e-2 * want.abs().max().item()
        if not err <= tol:
            failures.append(f"FP8 x FP8 M={m} N={n} K={k}: max error {err:.3g} > {tol:.3g}")
    return failures


def run_quant_rows(device: str) -> list[str]:
    from treadle.gpu_worker.layers.triton_fp8 import quant_groups, quant_rows

    x = torch.randn(7, 300, generator=torch.Generator().manual_seed(1)).to(device)
    x[3] = 0.0
    q, s = quant_rows(x)
    back = q.float() * s[:, None]
    ok = torch.allclose(back, x, rtol=2**-4, atol=2e-5) and torch.allclose(s[:3], x[:3].abs().amax(1) / 448)
    failures = [] if ok else [f"quant_rows: max error {(back - x).abs().max().item():.3g}"]
    q, s = quant_groups(x, 32)  # 300 columns: 10 groups, the last one short
    back = q.float() * s.repeat_interleave(32, 1)[:, :300]
    if s.shape != (7, 10) or not torch.allclose(back, x, rtol=2**-4, atol=2e-5):
        failures.append(f"quant_groups: max error {(back - x).abs().max().item():.3g}")
    return failures


def test_kernels_in_the_triton_interpreter():
    assert interpret_script(__file__) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("form", ["tensor", "channel", "block"])
def test_gpu_kernels_match_dequantize_then_matmul(form):
    cases = [(m, n, k, form, bias) for m in GPU_MS for n, k, bias in ((4096, 4096, False), (1024, 576, True))]
    assert run_cases("cuda", torch.bfloat16, cases) == []
    assert run_quant_rows("cuda") == [] and run_fp8_x_fp8("cuda", torch.bfloat16) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fp8_products_replay_in_a_cuda_graph():
    from fp8_checkpoints import rounded_activations

    gen = torch.Generator().manual_seed(2)
    for form in ("channel", "block"):
        layer, deq = _weights(1024, 4096, form, gen, "cuda")
        for m in (1, 8, 64):
            x = torch.zeros(m, 4096, device="cuda", dtype=torch.bfloat16)
            layer.product(x, None)  # compile outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = layer.product(x, None)
            for seed in range(2):
                x.copy_(torch.randn(m, 4096, generator=torch.Generator().manual_seed(seed)).to("cuda", torch.bfloat16))
                graph.replay()
                xr = rounded_activations(x.float(), 32 if form == "block" else 4096) if m > SKINNY_MAX else x.float()
                want = xr @ deq.T
                torch.testing.assert_close(y.float(), want, atol=1e-2 * want.abs().max().item(), rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fp8_gemv_with_pdl_gives_the_same_bits():
    from treadle.gpu_worker.layers.pdl import pdl_supported

    if not pdl_supported(torch.device("cuda")):
        pytest.skip("no PDL on this GPU / Triton")
    gen = torch.Generator().manual_seed(3)
    for form in ("channel", "block"):
        layer, _ = _weights(4096, 4096, form, gen, "cuda")
        x = torch.randn(1, 4096, generator=gen).to("cuda", torch.bfloat16)
        plain = layer.product(x, None)
        layer.pdl = True
        assert torch.equal(layer.product(x, None), plain)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (set before triton loads)"
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # fp8_checkpoints
    # (quant_rows only on CUDA: the interpreter's float -> e4m3 cast drops the carry into the exponent, 127.7 -> 64)
    print(json.dumps(run_cases("cpu", torch.float32, KERNEL_CASES) + run_fp8_x_fp8("cpu", torch.float32)))


def test_torchao_config_is_checked_with_the_other_arguments():
    from treadle.runtime.server_args import ServerArgs
    from treadle.runtime.torchao_args import check_torchao, parse_torchao_config

    assert parse_torchao_config("int4wo-64") == ("int4wo", 64) and parse_torchao_config("") is None
    assert parse_torchao_config("fp8dq-per_row") == ("fp8dq-per_row", 0)
    with pytest.raises(ValueError, match="torchao_config must be one of"):
        ServerArgs(torchao_config="int4wo-65")
    with pytest.raises(ValueError, match="cannot be combined with quantization='fp8'"):
        ServerArgs(torchao_config="int8wo", quantization="fp8")
    ServerArgs(torchao_config="int8wo").check_supported()  # no longer refused as unbuilt
    with pytest.raises(ValueError, match="needs bfloat16 weights"):
        check_torchao("int4wo-128", "cuda", "float16")
    check_torchao("int4wo-128", "cuda", "auto")
    ServerArgs(quantization="fp8").check_supported()
