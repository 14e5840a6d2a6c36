"""FP8 weights on CUDA (``pytest.mark.gpu``): a small Llama in each FP8 form (per-tensor ``fp8``,
per-channel ``compressed-tensors``, 128x128 blocks, and ``quantization="fp8"`` on a float
checkpoint) through ``ModelRunner`` in bfloat16 with the Triton backend and CUDA graphs: a
prefill of three prompts (the FP8 x FP8 paths: ``_scaled_mm`` or the block GEMM), then teacher-
forced decode steps at batch 3 (W8A16 GEMM) and batch 1 (the FP8 GEMV), each step's logits
against HF float32 on the same (dequantized, or row-rounded) weights. The bound, 5e-2 relative
(Frobenius per step), is bf16's ~1e-2 on random weights (test_gpu_parity.py) plus the rounding
of activations to e4m3 in the prefill; the figures print for docs/perf.md.
"""

from __future__ import annotations

import pytest
import torch

from fp8_checkpoints import fp8_pack, make_fp8_model, save_model, tiny_llama
from gpu_helpers import needs_gpus

pytestmark = [*needs_gpus(1), pytest.mark.e2e]

SIZES = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 2, "num_attention_heads": 8,
         "num_key_value_heads": 2, "initializer_range": 0.05}
TOL = 5e-2


def fp8_model(form: str, path: str, tokenizer_dir: str):
    """The checkpoint directory's reference HF model (float32) and the runner's quantization."""
    if form != "dynamic":
        return make_fp8_model(path, tokenizer_dir, form, block=128, **SIZES), None
    hf, tok = tiny_llama(tokenizer_dir, **SIZES)
    save_model(hf, tok, tokenizer_dir, path)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("proj.weight"):
                p.copy_(fp8_pack(p.data, "channel")[2])  # what quantization="fp8" serves
    return hf, "fp8"


@pytest.mark.parametrize("form", ["tensor", "channel", "block", "dynamic"])
def test_fp8_logits_match_hf_on_the_dequantized_weights(form, tmp_path, default_model_dir):
    from treadle.gpu_worker.model_runner import ModelRunner, RunnerConfig
    from treadle.runtime.messages import ForwardPlan, NewSlot, PlanRow, SamplingSpec

    hf, quantization = fp8_model(form, str(tmp_path), default_model_dir)
    runner = ModelRunner(RunnerConfig(model_dir=str(tmp_path), dtype="bfloat16", device="cuda", kv_tokens=4096,
                                      max_slots=4, context_len=512, attention_backend="triton", cuda_graph_max_bs=4,
                                      quantization=quantization))
    assert runner.model.model.layers[0].mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    g = torch.Generator().manual_seed(0)
    lens, steps = [40, 90, 130], 8
    seqs = [torch.randint(0, hf.config.vocab_size, (n + 2 * steps,), generator=g).tolist() for n in lens]
    with torch.no_grad():
        ref = [hf(torch.tensor([s])).logits[0].float() for s in seqs]
    greedy, used = SamplingSpec(temperature=0.0, top_k=1), [0]

    def locs(n: int) -> list[int]:
        used[0] += n
        return list(range(used[0] - n, used[0]))

    worst = {"prefill": 0.0, "batch 3": 0.0, "batch 1": 0.0}
    rows = [PlanRow(i, s[:n], 0, locs(n)) for i, (s, n) in enumerate(zip(seqs, lens))]
    out = runner.forward_logits(ForwardPlan(step=0, new_slots=[NewSlot(i, greedy) for i in range(3)], rows=rows))
    for k in range(2 * steps):
        kind = "prefill" if k == 0 else "batch 3" if k <= steps else "batch 1"
        live = range(3) if k <= steps else [0]
        for j, i in enumerate(live):
            want = ref[i][lens[i] - 1 + k]
            worst[kind] = max(worst[kind], float((out[j].cpu() - want).norm() / want.norm()))
        pos = [lens[i] + k for i in live]
        rows = [PlanRow(i, [seqs[i][p]], p, locs(1)) for i, p in zip(live, pos)]
        out = runner.forward_logits(ForwardPlan(step=k + 1, rows=rows))
    print(f"FP8 {form}: max relative logits error vs HF fp32 on the dequantized weights: {worst}")
    assert max(worst.values()) < TOL, worst
