"""RL weight updates (``update_weights_from_*``: ``model_loader.load_checked``, which all three
paths share) on quantized models, on the CPU without an engine:

- ``quantization="fp8"``: new bf16 weights are quantized per row as a load quantizes them, so a
  ``ModelRunner`` updated from them serves what a fresh one loaded from them serves (on the CPU:
  the FP8 round trip of each weight), from tensors and from disk;
- FP8 layers as a GPU keeps them (e4m3 weights and scales; the CPU's ``finish`` skipped): float
  updates land in the layer's own scale layout on every tensor-parallel rank, also for a block-
  scaled checkpoint (per row and block of columns);
- AWQ/GPTQ: refused with the reason, the old weights serving on.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from kernel_helpers import Alloc
from treadle.gpu_worker import distributed, fp8
from treadle.gpu_worker.layers.fp8_linear import dequantize, quantize_groups, quantize_rows
from treadle.gpu_worker.loader import iter_safetensors
from treadle.gpu_worker.model_loader import build_model, load_checked, reload_weights
from treadle.gpu_worker.model_runner import ModelRunner, RunnerConfig
from treadle.runtime.llava_layout import load_model_config
from treadle.runtime.messages import ForwardPlan, NewSlot, PlanRow, SamplingSpec

CONFIG = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.08, bos_token_id=None,
              eos_token_id=None, pad_token_id=0, tie_word_embeddings=False)
PROMPTS = [[5, 17, 99, 3, 250], [7, 7, 8, 200, 11, 42]]
CPU = torch.device("cpu")


def _perturbed(hf: LlamaForCausalLM, seed: int) -> dict[str, torch.Tensor]:
    """A trainer's next weights: every tensor moved a little, in bf16."""
    gen = torch.Generator().manual_seed(seed)
    return {n: (p.data + 0.02 * torch.randn(p.shape, generator=gen)).to(torch.bfloat16)
            for n, p in hf.named_parameters()}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(float32 checkpoint, its perturbed bf16 successor as a checkpoint, the successor's tensors)."""
    root = tmp_path_factory.mktemp("updates")
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**CONFIG))
    base, new = str(root / "base"), str(root / "new")
    hf.save_pretrained(base)
    tensors = _perturbed(hf, 1)
    hf.save_pretrained(new)
    save_file(tensors, os.path.join(new, "model.safetensors"))  # the bf16 tensors replace the float32 ones
    return base, new, tensors


def _runner(path: str, **kw) -> ModelRunner:
    return ModelRunner(RunnerConfig(model_dir=path, device="cpu", dtype="float32", kv_tokens=256, max_slots=4,
                                    context_len=128, **kw))


def _serve(runner: ModelRunner, steps: int = 6) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy tokens of every prompt (decoded together) and the prefill's last-token logprobs."""
    alloc, out = Alloc(len(PROMPTS), 256), [[] for _ in PROMPTS]
    new = [NewSlot(s, SamplingSpec(temperature=0.0)) for s in range(len(PROMPTS))]
    rows = [PlanRow(s, p, 0, alloc(len(p))) for s, p in enumerate(PROMPTS)]
    logprobs = torch.log_softmax(runner.forward_logits(ForwardPlan(step=0, new_slots=new, rows=rows)), -1)
    for step in range(steps):
        ids, _ = runner.forward(ForwardPlan(step=step, new_slots=new if step == 0 else [], rows=rows))
        for s, tok in enumerate(ids):
            out[s].append(tok)
        rows = [PlanRow(s, [out[s][-1]], len(PROMPTS[s]) + len(out[s]) - 1, alloc(1)) for s in range(len(PROMPTS))]
    return out, logprobs


@torch.no_grad()
@pytest.mark.parametrize("source", ["tensors", "disk"])
def test_fp8_model_updated_from_bf16_serves_what_a_fresh_load_of_them_serves(dirs, source):
    base, new, tensors = dirs
    want_tokens, want = _serve(_runner(new, quantization="fp8"))
    runner = _runner(base, quantization="fp8")
    old_tokens, old = _serve(runner)
    if source == "tensors":
        named = list(tensors.items())
        load_checked(runner.model, runner.model_config, 128, CPU, lambda m: m.load_weights(named, complete=False))
    else:
        reload_weights(runner.model, new, None, runner.model_config, 128, CPU)
    tokens, got = _serve(runner)
    assert tokens == want_tokens and torch.equal(got, want)
    assert (old - want).abs().max() > 0.05  # the update changed what it serves
    _, unrounded = _serve(_runner(new))  # the same weights without FP8: the rounding is visible
    assert (unrounded - want).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("form", ["dynamic", "tensor", "block"])
def test_fp8_layers_take_float_updates_in_their_scale_layout_on_every_rank(form, tmp_path, default_model_dir,
                                                                             monkeypatch):
    """The layers as the GPU keeps them: e4m3 weights with per-row scales (``quantization="fp8"``, a
    per-tensor checkpoint) or per row and block of 32 columns (a block checkpoint's layout), at
    tp_size 1 through ``load_checked`` and for each rank of tp_size 2 (no processes: layouts only)."""
    from fp8_checkpoints import make_fp8_model, save_model, tiny_llama

    if form == "dynamic":
        hf, tok = tiny_llama(default_model_dir)
        save_model(hf, tok, default_model_dir, str(tmp_path))
    else:
        hf = make_fp8_model(str(tmp_path), default_model_dir, form)
    cfg, quantization = load_model_config(str(tmp_path)), "fp8" if form == "dynamic" else None
    new = _perturbed(hf, 2)

    def loaded() -> torch.nn.Module:
        model = build_model(cfg, torch.float32, CPU, 64, quantization)
        model.load_weights(fp8.checkpoint_tensors(iter_safetensors(str(tmp_path), progress=False)))
        return model  # (no fp8.finish: FP8 layers stay as on a GPU)

    def want(name: str, rows: slice = slice(None), cols: slice = slice(None)) -> torch.Tensor:
        w = new[name].float()
        q, s = quantize_groups(w, 32) if form == "block" else quantize_rows(w)
        return dequantize(q, s, 32)[rows, cols]

    def check(model: torch.nn.Module, rank: int, tp: int) -> None:
        def mine(size: int) -> slice:  # this rank's share of ``size`` rows (or columns)
            return slice(size // tp * rank, size // tp * (rank + 1))

        attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
        hf_attn, hf_mlp = "model.layers.1.self_attn", "model.layers.1.mlp"
        expected = {
            attn.qkv_proj: [want(f"{hf_attn}.q_proj.weight", mine(64))] + [want(f"{hf_attn}.{p}_proj.weight", mine(32))
                                                                           for p in "kv"],
            mlp.gate_up_proj: [want(f"{hf_mlp}.{p}_proj.weight", mine(128)) for p in ("gate", "up")],
            mlp.down_proj: [want(f"{hf_mlp}.down_proj.weight", cols=mine(128))],
        }
        for mod, parts in expected.items():
            assert mod.weight.dtype == torch.float8_e4m3fn and mod.weight_scale.dim() == (2 if form == "block" else 1)
            assert torch.equal(dequantize(mod.weight, mod.weight_scale, 32), torch.cat(parts))

    model = loaded()
    load_checked(model, cfg, 64, CPU, lambda m: m.load_weights(list(new.items()), complete=False))
    check(model, 0, 1)
    monkeypatch.setattr(distributed, "_TP_SIZE", 2)
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "_TP_RANK", rank)
        model = loaded()
        model.load_weights(list(new.items()), complete=False)
        check(model, rank, 2)


def test_fp8_tensors_are_refused_where_float_ones_are_expected(dirs):
    base, _, _ = dirs
    runner = _runner(base, quantization="fp8")
    q = [("model.layers.0.mlp.down_proj.weight", torch.zeros(64, 128, dtype=torch.float8_e4m3fn))]
    with pytest.raises(ValueError, match="float"):
        load_checked(runner.model, runner.model_config, 128, CPU, lambda m: m.load_weights(q, complete=False))


@torch.no_grad()
def test_a_layer_kept_float_for_its_mixed_parts_takes_fp8_parts_with_their_scales(tmp_path, default_model_dir):
    """``qkv_proj`` with q_proj left float and k/v FP8 runs in float (``fp8_ignored``): a new FP8
    k_proj with its scale (either order) lands dequantized; one without its scale is refused
    before anything changes; a float part is taken as it is."""
    from fp8_checkpoints import MIXED, fp8_pack, make_fp8_model
    from treadle.gpu_worker.model_loader import load_weights

    make_fp8_model(str(tmp_path), default_model_dir, "tensor", float_modules=MIXED)
    cfg = load_model_config(str(tmp_path))
    model = build_model(cfg, torch.float32, CPU, 64)
    load_weights(model, str(tmp_path), "auto", cfg, 0, 0.0)
    qkv, attn = model.model.layers[0].self_attn.qkv_proj, "model.layers.0.self_attn"
    gen = torch.Generator().manual_seed(4)
    k, q = torch.randn(32, 64, generator=gen), torch.randn(64, 64, generator=gen)
    codes, scale, want_k = fp8_pack(k, "tensor")
    before = qkv.weight.clone()
    with pytest.raises(ValueError, match="an FP8 weight without its weight_scale"):
        load_checked(model, cfg, 64, CPU, lambda m: m.load_weights([(f"{attn}.k_proj.weight", codes)], complete=False))
    assert torch.equal(qkv.weight, before)
    new = [(f"{attn}.k_proj.weight_scale", scale), (f"{attn}.q_proj.weight", q), (f"{attn}.k_proj.weight", codes)]
    load_checked(model, cfg, 64, CPU, lambda m: m.load_weights(new, complete=False))
    assert torch.equal(qkv.weight, torch.cat([q, want_k, before[96:]]))


@pytest.fixture(scope="module")
def awq_dir(tmp_path_factory):
    from int4_pack import awq_quantize

    torch.manual_seed(0)
    hf, tensors = LlamaForCausalLM(LlamaConfig(**CONFIG)), {}
    for name, p in hf.named_parameters():
        if name.endswith("proj.weight"):
            base = name[:-len(".weight")]
            tensors.update(zip((f"{base}.qweight", f"{base}.qzeros", f"{base}.scales"), awq_quantize(p.data, 32)[:3]))
        else:
            tensors[name] = p.data.clone()
    path = str(tmp_path_factory.mktemp("awq_updates"))
    hf.config.quantization_config = {"quant_method": "awq", "bits": 4, "group_size": 32}
    hf.config.save_pretrained(path)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    return path, hf


@torch.no_grad()
def test_int4_updates_are_refused_with_the_reason(awq_dir, dirs):
    """On the CPU an AWQ model runs dequantized, so a float update could load; it is refused as on
    the GPU, from tensors and from disk, naming why, and the model serves on unchanged."""
    path, hf = awq_dir
    runner = _runner(path)
    tokens, before = _serve(runner)
    named = list(_perturbed(hf, 3).items())
    refused = r"4-bit \(AWQ\) model is not supported: a trainer has float weights.*calibration"
    with pytest.raises(ValueError, match=refused):
        load_checked(runner.model, runner.model_config, 128, CPU, lambda m: m.load_weights(named, complete=False))
    with pytest.raises(ValueError, match="calibration"):
        reload_weights(runner.model, dirs[1], None, runner.model_config, 128, CPU)
    after_tokens, after = _serve(runner)
    assert after_tokens == tokens and torch.equal(after, before)
