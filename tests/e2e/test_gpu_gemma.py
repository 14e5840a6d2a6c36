"""Sliding windows and soft-capping on CUDA (Triton kernels, CUDA graphs) against HF transformers:
Gemma 2, Gemma 3 text and Mistral as the tiny models of ``window_models.py`` (windows 8-12,
soft-caps on), and a Gemma-3-12B-shaped model cut to 8 layers (full width: 16/8 heads of 256,
window 1024, one global layer of six; random weights, prompts past the window).

1. bfloat16 logits: prefill of 3 sequences, then 32 decode steps through ``ModelRunner`` with the
   Triton backend and CUDA graphs, against HF's forward over the whole sequence (eager attention):
   the relative error against HF float32 must stay within 1.5x HF bf16's own error against HF
   float32 (or under 1e-2), the error of a bf16 implementation on random weights.
2. float32 greedy tokens of the Engine on CUDA (graphs and overlap on) equal HF ``generate``'s.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from gpu_helpers import CONFIGS, build_random_model, copy_tokenizer_files, first_differences, needs_gpus, \
    random_prompts, smollm2_dir, treadle_run
from window_models import make_window_model

pytestmark = [*needs_gpus(1), pytest.mark.e2e]

TINY = ["gemma2", "gemma3", "mistral"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    built: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in built:
            out = str(tmp_path_factory.mktemp(name))
            if name == "gemma3_12b_8layers":
                cfg_dir = str(tmp_path_factory.mktemp("gemma3_12b_config"))
                with open(CONFIGS / "gemma-3-12b" / "config.json") as f:
                    cfg = json.load(f)
                with open(os.path.join(cfg_dir, "config.json"), "w") as f:
                    json.dump({**cfg, "num_hidden_layers": 8}, f)
                copy_tokenizer_files(smollm2_dir(), cfg_dir, generation_config=False)
                build_random_model(cfg_dir, out, init_range=0.02)
            else:
                make_window_model(name, out, smollm2_dir())
            built[name] = out
        return built[name]

    return get


def logits_errors(d: str, lens: list[int], steps: int = 32, device: str = "cuda") -> tuple[float, float]:
    """Worst per-step relative error of (ours bf16 vs HF fp32, HF bf16 vs HF fp32). ``device="cpu"``
    (torch_native, no graphs) only smoke-tests this function off the GPU."""
    from transformers import AutoModelForCausalLM

    from treadle.gpu_worker.model_runner import ModelRunner, RunnerConfig
    from treadle.runtime.messages import ForwardPlan, NewSlot, PlanRow, SamplingSpec

    cuda = device == "cuda"
    runner = ModelRunner(RunnerConfig(model_dir=d, dtype="bfloat16", device=device, kv_tokens=8192, max_slots=8,
                                      context_len=4096, attention_backend="triton" if cuda else "torch_native",
                                      cuda_graph_max_bs=8 if cuda else 0))
    assert runner.graphs is not None or not cuda
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 40000, (n + steps,), generator=g).tolist() for n in lens]
    refs = {}
    for key, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=dt, attn_implementation="eager").to(device).eval()
        with torch.inference_mode():
            refs[key] = [hf(torch.tensor([s], device=device)).logits[0].float() for s in seqs]
        del hf
    next_loc, worst = 0, [0.0, 0.0]

    def locs(n: int) -> list[int]:
        nonlocal next_loc
        next_loc += n
        return list(range(next_loc - n, next_loc))

    greedy = SamplingSpec(temperature=0.0, top_k=1)
    rows = [PlanRow(i, s[:n], 0, locs(n)) for i, (s, n) in enumerate(zip(seqs, lens))]
    out = runner.forward_logits(ForwardPlan(step=0, new_slots=[NewSlot(i, greedy) for i in range(len(lens))],
                                            rows=rows))
    for k in range(steps + 1):
        for i, n in enumerate(lens):
            exact, hf16 = refs["fp32"][i][n - 1 + k], refs["bf16"][i][n - 1 + k]
            worst[0] = max(worst[0], float((out[i].to(exact.device) - exact).norm() / exact.norm()))
            worst[1] = max(worst[1], float((hf16 - exact).norm() / exact.norm()))
        if k == steps:
            break
        rows = [PlanRow(i, [s[n + k]], n + k, locs(1)) for i, (s, n) in enumerate(zip(seqs, lens))]
        out = runner.forward_logits(ForwardPlan(step=k + 1, rows=rows))
    del runner
    return worst[0], worst[1]


@pytest.mark.parametrize("name,lens", [("gemma3_12b_8layers", [37, 1100, 1600])] +
                         [(n, [37, 100, 251]) for n in TINY])
def test_bf16_logits_match_hf(model_dir, name, lens):
    err, floor = logits_errors(model_dir(name), lens)
    print(f"{name}: bf16 logits, prefill + 32 decode steps (graphs): max relative error vs HF fp32 {err:.2e} "
          f"(HF bf16 vs HF fp32: {floor:.2e})")
    assert err < max(1e-2, 1.5 * floor), (err, floor)


@pytest.mark.parametrize("name", TINY)
def test_float32_greedy_matches_hf(model_dir, name):
    from transformers import AutoModelForCausalLM

    d = model_dir(name)
    prompts = random_prompts((7, 31, 64, 120))
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").cuda().eval()
    want = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids], device="cuda")
            g = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, min_new_tokens=32, do_sample=False)
            want.append(g[0, len(ids):].tolist())
    del hf
    got, _ = treadle_run(d, prompts, 32, "float32", concurrent=True)
    print(f"{name}: float32 greedy on CUDA (graphs + overlap): {sum(a == b for a, b in zip(want, got))}/4 identical")
    assert got == want, f"first differing token per prompt: {first_differences(want, got)}"
