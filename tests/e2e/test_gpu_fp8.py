"""FP8 weights on CUDA (``pytest.mark.gpu``): a small Llama in each FP8 form (per-tensor ``fp8``,
per-channel ``compressed-tensors``, 128x128 blocks, and ``quantization="fp8"`` on a float
checkpoint) through ``ModelRunner`` in bfloat16 with the Triton backend and CUDA graphs, logits
against HF float32 on the same (dequantized, or row-rounded) weights.

1. Unrounded activations (the GEMV and the W8A16 GEMM): three prompts prefilled 16 tokens a step,
   then teacher-forced decode at batch 3 (graphs) and batch 1 (the GEMV). Bound 3e-2 relative
   (Frobenius per position): bf16's own error on these weights is ~1.2e-2 (HF bf16 vs fp32, CPU).
2. The FP8 x FP8 paths (``_scaled_mm``, the block GEMM): three prompts prefilled in one step,
   against HF with each linear input rounded to e4m3 the same way. bf16 and float32 activations
   round to different e4m3 neighbours here and there (one e4m3 step is 12.5%), which on these
   random weights alone moves the logits by up to ~8e-2 (measured with HF bf16 vs fp32 on the
   CPU): bound 0.15, far below what a wrong scale or layout gives (order 1). This part catches
   gross errors only (the rounding itself moves these logits by ~6e-2); the kernel tests
   (tests/unit/test_fp8.py) hold the tight check of these paths.
The figures print, for docs/perf.md.
"""

from __future__ import annotations

import pytest
import torch

from fp8_checkpoints import fp8_pack, make_fp8_model, rounded_activations, save_model, tiny_llama
from gpu_helpers import needs_gpus

pytestmark = [*needs_gpus(1), pytest.mark.e2e]

SIZES = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 2, "num_attention_heads": 8,
         "num_key_value_heads": 2, "initializer_range": 0.02}
TIGHT, ROUNDED = 3e-2, 0.15
LENS, STEPS, CHUNK = [40, 90, 130], 8, 16


def fp8_model(form: str, path: str, tokenizer_dir: str):
    """The reference HF model (float32) of the checkpoint written to ``path``, and the runner's quantization."""
    if form != "dynamic":
        return make_fp8_model(path, tokenizer_dir, form, block=128, **SIZES), None
    hf, tok = tiny_llama(tokenizer_dir, **SIZES)
    save_model(hf, tok, tokenizer_dir, path)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("proj.weight"):
                p.copy_(fp8_pack(p.data, "channel")[2])  # what quantization="fp8" serves
    return hf, "fp8"


def hf_logits(hf, seq: list[int], rounded_rows: int = 0, group: int = 0) -> torch.Tensor:
    """HF's logits of ``seq``; the first ``rounded_rows`` rows of every decoder linear's input
    rounded to e4m3 per token and ``group`` columns (what the FP8 x FP8 paths compute)."""
    def round_rows(module, args):
        x = args[0].clone()
        x[0, :rounded_rows] = rounded_activations(x[0, :rounded_rows], group or x.shape[-1])
        return (x,)

    hooks = [m.register_forward_pre_hook(round_rows) for n, m in hf.named_modules()
             if rounded_rows and isinstance(m, torch.nn.Linear) and ".layers." in n]
    try:
        with torch.no_grad():
            return hf(torch.tensor([seq])).logits[0].float()
    finally:
        for h in hooks:
            h.remove()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b).norm() / b.norm())


@pytest.mark.parametrize("form", ["tensor", "channel", "block", "dynamic"])
def test_fp8_logits_match_hf_on_the_dequantized_weights(form, tmp_path, default_model_dir):
    from treadle.gpu_worker.model_runner import ModelRunner, RunnerConfig
    from treadle.runtime.messages import ForwardPlan, NewSlot, PlanRow, SamplingSpec

    hf, quantization = fp8_model(form, str(tmp_path), default_model_dir)
    runner = ModelRunner(RunnerConfig(model_dir=str(tmp_path), dtype="bfloat16", device="cuda", kv_tokens=8192,
                                      max_slots=8, context_len=512, attention_backend="triton", cuda_graph_max_bs=4,
                                      quantization=quantization))
    assert runner.model.model.layers[0].mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    linear = sum(p.numel() for n, p in hf.named_parameters() if n.endswith("proj.weight"))
    bf16 = sum(p.numel() * 2 for p in hf.parameters())
    assert runner.info()["weight_bytes"] < bf16 - 0.9 * linear  # 1 byte a linear weight (+ scales), not 2
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, hf.config.vocab_size, (n + 2 * STEPS,), generator=g).tolist() for n in LENS]
    greedy, used, step = SamplingSpec(temperature=0.0, top_k=1), [0], [0]

    def run(rows, new_slots=()) -> torch.Tensor:
        step[0] += 1
        return runner.forward_logits(ForwardPlan(step=step[0], new_slots=list(new_slots), rows=rows))

    def locs(n: int) -> list[int]:
        used[0] += n
        return list(range(used[0] - n, used[0]))

    # 1. unrounded activations: slots 0-2, 16 tokens a step, then decode at batch 3 and 1
    worst = {"chunked prefill": 0.0, "batch 3": 0.0, "batch 1": 0.0, "FP8 x FP8 prefill": 0.0}
    refs = [hf_logits(hf, s) for s in seqs]
    for i, (s, n) in enumerate(zip(seqs, LENS)):
        for start in range(0, n, CHUNK):
            out = run([PlanRow(i, s[start:min(n, start + CHUNK)], start, locs(min(CHUNK, n - start)))],
                      [NewSlot(i, greedy)] if start == 0 else [])
        worst["chunked prefill"] = max(worst["chunked prefill"], rel(out[0], refs[i][n - 1]))
    for k in range(2 * STEPS):
        live = range(3) if k < STEPS else [0]
        out = run([PlanRow(i, [seqs[i][LENS[i] + k]], LENS[i] + k, locs(1)) for i in live])
        for j, i in enumerate(live):
            kind = "batch 3" if k < STEPS else "batch 1"
            worst[kind] = max(worst[kind], rel(out[j], refs[i][LENS[i] + k]))
    # 2. the FP8 x FP8 paths: slots 3-5, one prefill step of all three prompts
    rows = [PlanRow(3 + i, s[:n], 0, locs(n)) for i, (s, n) in enumerate(zip(seqs, LENS))]
    out = run(rows, [NewSlot(3 + i, greedy) for i in range(3)])
    for i, (s, n) in enumerate(zip(seqs, LENS)):
        ref = hf_logits(hf, s[:n], n, 128 if form == "block" else 0)[n - 1]
        worst["FP8 x FP8 prefill"] = max(worst["FP8 x FP8 prefill"], rel(out[i], ref))
    print(f"FP8 {form}: max relative logits error vs HF fp32 on the same weights: {worst}")
    assert max(v for k, v in worst.items() if k != "FP8 x FP8 prefill") < TIGHT, worst
    assert worst["FP8 x FP8 prefill"] < ROUNDED, worst


@torch.no_grad()
def test_mixed_fused_layers_run_in_bf16_beside_fp8_ones(tmp_path, default_model_dir):
    """128x128 blocks with q_proj (layer 0) and up_proj (layer 1) left float by ``ignored_layers``:
    those fused layers hold the packer's dequantized weights in bf16 (their FP8 parts by their own
    scales), the others stay FP8; a 12-token prefill (the W8A16 path) gives HF's logits as above."""
    from fp8_checkpoints import MIXED
    from treadle.gpu_worker.model_runner import ModelRunner, RunnerConfig
    from treadle.runtime.messages import ForwardPlan, NewSlot, PlanRow, SamplingSpec

    hf = make_fp8_model(str(tmp_path), default_model_dir, "block", block=128, float_modules=MIXED, **SIZES)
    runner = ModelRunner(RunnerConfig(model_dir=str(tmp_path), dtype="bfloat16", device="cuda", kv_tokens=1024,
                                      max_slots=4, context_len=256, attention_backend="triton", cuda_graph_max_bs=4))
    layers, w = runner.model.model.layers, dict(hf.named_parameters())
    want = torch.cat([w[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]).to("cuda", torch.bfloat16)
    assert torch.equal(layers[0].self_attn.qkv_proj.weight, want)
    assert layers[1].mlp.gate_up_proj.weight.dtype == torch.bfloat16
    assert layers[1].self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn  # parts that agree keep FP8
    seq = torch.randint(0, hf.config.vocab_size, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    out = runner.forward_logits(ForwardPlan(step=1, new_slots=[NewSlot(0, SamplingSpec(temperature=0.0, top_k=1))],
                                            rows=[PlanRow(0, seq, 0, list(range(12)))]))
    assert rel(out[0], hf_logits(hf, seq)[-1]) < TIGHT


@pytest.mark.parametrize("recipe", ["int8wo", "int4wo-128", "fp8wo", "fp8dq-per_tensor", "fp8dq-per_row"])
def test_torchao_recipes_on_cuda_match_hf_quantized_the_same_way(recipe, tmp_path, default_model_dir):
    """Each recipe serves through the engine (bf16, CUDA graphs); the logprobs of its greedy tokens
    are within 0.1 of transformers' model quantized with the same recipe on the same card."""
    import copy

    from torchao.quantization import quantize_

    from treadle import Engine
    from treadle.gpu_worker.torchao_quant import torchao_recipe

    hf, tok = tiny_llama(default_model_dir, **SIZES)
    save_model(hf, tok, default_model_dir, str(tmp_path))
    quantized = copy.deepcopy(hf).to("cuda", torch.bfloat16)
    quantize_(quantized.model, torchao_recipe(recipe))
    prompts = ["The capital of France is", "def fibonacci(n):"]
    with Engine(model_path=str(tmp_path), torchao_config=recipe, random_seed=0) as engine:
        outs = engine.generate(prompt=prompts, sampling_params={"temperature": 0, "max_new_tokens": 16},
                               return_logprob=True)
    for prompt, out in zip(prompts, outs):
        ids = tok(prompt, return_tensors="pt").input_ids[0].tolist()
        seq = torch.tensor([ids + out["output_ids"]], device="cuda")
        with torch.no_grad():
            logits = quantized(seq).logits[0, len(ids) - 1:-1].float()
        ref = torch.log_softmax(logits, -1).gather(1, seq[0, len(ids):, None])[:, 0].cpu()
        got = torch.tensor([lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]])
        assert (got - ref).abs().max() < 0.1, (recipe, got, ref)


@torch.no_grad()
def test_fp8_runner_updated_from_bf16_equals_a_fresh_one(tmp_path, default_model_dir):
    """``quantization="fp8"`` with CUDA graphs: new bf16 weights loaded in place (``load_checked``,
    the path of every ``update_weights_from_*``) are quantized per row on the device, so every FP8
    weight and scale equals a fresh runner's on them, and the captured graphs serve the new weights."""
    from treadle.gpu_worker.model_loader import load_checked
    from treadle.gpu_worker.model_runner import ModelRunner, RunnerConfig
    from treadle.runtime.messages import ForwardPlan, NewSlot, PlanRow, SamplingSpec

    hf, tok = tiny_llama(default_model_dir, **SIZES)
    gen = torch.Generator().manual_seed(1)
    new = {n: (p.data + 0.01 * torch.randn(p.shape, generator=gen)).to(torch.bfloat16)
           for n, p in hf.named_parameters()}
    base, fresh_dir = str(tmp_path / "base"), str(tmp_path / "new")
    save_model(hf, tok, default_model_dir, base)
    save_model(hf, tok, default_model_dir, fresh_dir, tensors=new)

    def runner(path: str) -> ModelRunner:
        return ModelRunner(RunnerConfig(model_dir=path, dtype="bfloat16", device="cuda", kv_tokens=4096, max_slots=4,
                                        context_len=256, attention_backend="triton", cuda_graph_max_bs=4,
                                        quantization="fp8"))

    prompt = torch.randint(0, hf.config.vocab_size, (40,), generator=gen).tolist()

    def serve(r: ModelRunner) -> torch.Tensor:  # a prefill, then two decode steps (graph replays)
        spec = SamplingSpec(temperature=0.0, top_k=1)
        out = [r.forward_logits(ForwardPlan(step=1, new_slots=[NewSlot(0, spec)],
                                            rows=[PlanRow(0, prompt, 0, list(range(40)))]))[0]]
        for k in range(2):
            out.append(r.forward_logits(ForwardPlan(step=2 + k, new_slots=[], rows=[
                PlanRow(0, [prompt[k]], 40 + k, [40 + k])]))[0])
        return torch.stack(out).float().cpu()

    fresh = runner(fresh_dir)
    want, want_params = serve(fresh), {n: p.clone() for n, p in fresh.model.named_parameters()}
    want_scales = {n: b.clone() for n, b in fresh.model.named_buffers() if n.endswith("weight_scale")}
    del fresh
    torch.cuda.empty_cache()
    r = runner(base)
    before = serve(r)
    load_checked(r.model, r.model_config, 256, r.device, lambda m: m.load_weights(list(new.items()), complete=False))
    for n, p in r.model.named_parameters():
        assert torch.equal(p.view(torch.uint8) if p.dtype == torch.float8_e4m3fn else p,
                           want_params[n].view(torch.uint8) if p.dtype == torch.float8_e4m3fn else want_params[n]), n
    for n, b in r.model.named_buffers():
        if n in want_scales:
            assert torch.equal(b, want_scales[n]), n
    got = serve(r)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)  # the same weights and kernels
    assert (before - want).abs().max() > 5e-2
