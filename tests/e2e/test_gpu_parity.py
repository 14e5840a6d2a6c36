"""The engine on CUDA against HF transformers on the same random weights (issue 6, acceptance 1;
formerly ``bench/gpu_check.py`` and ``bench/gpu_smoke.py``), at the SmolLM2-135M and Llama-3-mini
shapes (``bench/configs``: GQA 4:1, head_dim 128, llama3 RoPE).

1. bfloat16: prefill, then 32 teacher-forced decode steps of 3 sequences at once through
   ``ModelRunner`` with the Triton backend and CUDA graphs (batch 3 replays the padded graph of 4);
   the logits of every step against HF's forward over the whole sequence: relative error
   ``|ours - hf| / |hf|`` (Frobenius, per step) must stay under 1e-2. Also reported: the error of
   ours and of HF bf16 against HF float32, bf16's own error floor on these random weights, and
   how far HF bf16 with eager attention is from HF bf16 with its default (sdpa). On random weights
   two bf16 implementations differ by about 1e-2, so the target is not met as written (docs/perf.md:
   1.37e-2 and 1.09e-2, HF's own eager-vs-sdpa distance 1.52e-2 and 1.18e-2): an error over 1e-2
   but within HF's own distance is reported as an expected failure, one beyond it fails.
2. float32: the Engine (graphs and overlap scheduling on, the defaults) generates 32 greedy
   tokens for 4 prompts, all at once and one call each; they must equal HF ``generate``'s.
"""

from __future__ import annotations

import pytest
import torch

from gpu_helpers import (build_random_model, first_differences, hf_generate, needs_gpus, random_prompts, shape_dir,
                         treadle_run)

pytestmark = [*needs_gpus(1), pytest.mark.e2e]

SHAPES = ["smollm2", "llama3-mini"]
BF16_TOL = 1e-2
HF_INIT, WIDE_INIT = 0.02, 0.2  # HF's usual init for the bf16 logits; wide: no near-ties for greedy


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """``get(shape, init_range)``: the directory of seeded random weights, built once."""
    built: dict[tuple[str, float], str] = {}

    def get(shape: str, init_range: float) -> str:
        if (shape, init_range) not in built:
            root = tmp_path_factory.mktemp(f"{shape}-init{init_range}")
            out = str(root / "model")
            build_random_model(shape_dir(shape, str(root / "config")), out, init_range)
            built[shape, init_range] = out
        return built[shape, init_range]

    return get


def logits_errors(d: str, steps: int = 32, device: str = "cuda") -> tuple[float, float, float, float]:
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


@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_logits_match_hf(random_model, shape):
    err, vs_fp32, hf_floor, hf_impls = logits_errors(random_model(shape, HF_INIT))
    report = (f"{shape}: bf16 logits, prefill + 32 decode steps (graphs): max relative error {err:.2e} vs HF bf16, "
              f"{vs_fp32:.2e} vs HF fp32 (HF bf16 vs HF fp32: {hf_floor:.2e}; HF bf16 eager vs sdpa attention: "
              f"{hf_impls:.2e})")
    print(report)
    if BF16_TOL <= err <= hf_impls:
        pytest.xfail(f"{report}: over {BF16_TOL:g}, within HF's own eager-vs-sdpa distance (bf16 noise)")
    assert err < BF16_TOL, report


@pytest.fixture(scope="module")
def hf_greedy(random_model):
    """HF float32 ``generate``'s 32 greedy tokens of the 4 prompts, per shape."""
    done: dict[str, list[list[int]]] = {}

    def get(shape: str, prompts: list[list[int]]) -> list[list[int]]:
        if shape not in done:
            done[shape], _ = hf_generate(random_model(shape, WIDE_INIT), prompts, 32, torch.float32)
        return done[shape]

    return get


@pytest.mark.parametrize("concurrent", [True, False], ids=["at_once", "one_call_each"])
@pytest.mark.parametrize("shape", SHAPES)
def test_float32_greedy_matches_hf(random_model, hf_greedy, shape, concurrent):
    prompts = random_prompts((7, 31, 64, 120))
    want = hf_greedy(shape, prompts)
    got, _ = treadle_run(random_model(shape, WIDE_INIT), prompts, 32, "float32", concurrent=concurrent)
    same = sum(x == y for x, y in zip(want, got))
    print(f"{shape}: float32 greedy (graphs + overlap, {'at once' if concurrent else 'one call each'}): "
          f"{same}/{len(want)} prompts identical to HF")
    assert got == want, f"first differing token per prompt: {first_differences(want, got)}"
