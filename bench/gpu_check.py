"""GPU correctness of issue #6 (acceptance 1), against HF transformers on the same random weights.

    python bench/gpu_check.py --config-dir DIR [--config-dir DIR2 ...]   # DIR: config + tokenizer files

1. bfloat16: prefill, then 32 teacher-forced decode steps of 3 sequences at once through
   ``ModelRunner`` with the Triton backend and CUDA graphs (batch 3 replays the padded graph of 4);
   the logits of every step against HF's forward over the whole sequence: relative error
   ``|ours - hf| / |hf|`` (Frobenius, per step), must stay under 1e-2. Also printed: the error of
   ours and of HF bf16 against HF float32, bf16's own error floor on these random weights, and
   how far HF bf16 with eager attention is from HF bf16 with its default (sdpa).
2. float32: the Engine (graphs and overlap scheduling on, the defaults) generates 32 greedy
   tokens for 4 prompts; they must equal HF ``generate``'s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_smoke import build_random_model, hf_generate, treadle_run  # noqa: E402


def logits_check(d: str, steps: int = 32, device: str = "cuda") -> tuple[float, float, float, float]:
    """Worst per-step relative error of (ours vs HF bf16, ours vs HF fp32, HF bf16 vs HF fp32,
    HF bf16 vs HF bf16 with eager attention): the last two are bf16's own error and how far HF's
    two attention implementations are apart, the floor any bf16 implementation sits on."""
    from transformers import AutoModelForCausalLM

    from treadle.gpu_worker.model_runner import ModelRunner, RunnerConfig
    from treadle.runtime.messages import ForwardPlan, NewSlot, PlanRow, SamplingSpec

    cuda = device == "cuda"
    runner = ModelRunner(RunnerConfig(model_dir=d, dtype="bfloat16", device=device, kv_tokens=8192, max_slots=8,
                                      context_len=1024, attention_backend="triton" if cuda else "torch_native",
                                      cuda_graph_max_bs=8 if cuda else 0))
    assert runner.graphs is not None or not cuda
    g = torch.Generator().manual_seed(3)
    lens = [37, 100, 251]
    seqs = [torch.randint(0, 40000, (n + steps,), generator=g).tolist() for n in lens]
    refs = {}
    for key, dt, impl in (("bf16", torch.bfloat16, "sdpa"), ("fp32", torch.float32, "sdpa"),
                          ("eager", torch.bfloat16, "eager")):
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=dt, attn_implementation=impl).to(device).eval()
        with torch.inference_mode():
            refs[key] = [hf(torch.tensor([s], device=device)).logits[0].float() for s in seqs]
        del hf
    ref, truth, eager = refs["bf16"], refs["fp32"], refs["eager"]
    next_loc, worst = 0, [0.0, 0.0, 0.0, 0.0]

    def locs(n: int) -> list[int]:
        nonlocal next_loc
        next_loc += n
        return list(range(next_loc - n, next_loc))

    greedy = SamplingSpec(temperature=0.0, top_k=1)
    rows = [PlanRow(i, s[:n], 0, locs(n)) for i, (s, n) in enumerate(zip(seqs, lens))]
    out = runner.forward_logits(ForwardPlan(step=0, new_slots=[NewSlot(i, greedy) for i in range(3)], rows=rows))
    for k in range(steps + 1):
        for i, n in enumerate(lens):
            want, exact, other = ref[i][n - 1 + k], truth[i][n - 1 + k], eager[i][n - 1 + k]
            for j, (a, b) in enumerate(((out[i], want), (out[i], exact), (want, exact), (other, want))):
                worst[j] = max(worst[j], float((a.to(b.device) - b).norm() / b.norm()))
        if k == steps:
            break
        rows = [PlanRow(i, [s[n + k]], n + k, locs(1)) for i, (s, n) in enumerate(zip(seqs, lens))]
        out = runner.forward_logits(ForwardPlan(step=k + 1, rows=rows))
    return tuple(worst)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config-dir", action="append", required=True)
    p.add_argument("--logits-only-on", default="", help="e.g. cpu: only the bf16 logits check, on that device")
    a = p.parse_args()
    if a.logits_only_on:
        for cfg in a.config_dir:
            d = tempfile.mkdtemp(prefix="treadle-check-")
            build_random_model(cfg, d, init_range=0.02)
            err, vs_fp32, hf_floor, hf_impls = logits_check(d, device=a.logits_only_on)
            print(f"{cfg} on {a.logits_only_on}: bf16 logits max relative error {err:.2e} vs HF bf16, {vs_fp32:.2e} "
                  f"vs HF fp32 (HF bf16 vs HF fp32: {hf_floor:.2e}; HF bf16 eager vs sdpa attention: {hf_impls:.2e})",
                  flush=True)
        return
    ok = True
    for cfg in a.config_dir:
        d = tempfile.mkdtemp(prefix="treadle-check-")
        build_random_model(cfg, d, init_range=0.02)  # HF's usual init for the bf16 logits
        err, vs_fp32, hf_floor, hf_impls = logits_check(d)
        build_random_model(cfg, d)  # wide init: no near-ties for the greedy comparison
        print(f"{cfg}: bf16 logits, prefill + 32 decode steps (graphs): max relative error {err:.2e} vs HF bf16, "
              f"{vs_fp32:.2e} vs HF fp32 (HF bf16 vs HF fp32: {hf_floor:.2e}; HF bf16 eager vs sdpa attention: "
              f"{hf_impls:.2e})", flush=True)
        ok &= err < 1e-2
        gen = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, 40000, (int(n),), generator=gen).tolist() for n in (7, 31, 64, 120)]
        ref, _ = hf_generate(d, prompts, 32, torch.float32)
        got, _ = treadle_run(d, prompts, 32, "float32", concurrent=True)
        same = sum(x == y for x, y in zip(ref, got))
        print(f"{cfg}: float32 greedy (graphs + overlap): {same}/{len(ref)} prompts identical to HF", flush=True)
        ok &= same == len(ref)
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
