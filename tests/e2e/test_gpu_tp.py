"""Tensor parallelism against one rank on the same weights, on two GPUs (issue 9, point 1;
formerly ``bench/gpu_tp_check.py``).

Saves seeded random bf16 weights of a config once, then runs the same plans through
``ModelRunner`` with ``tp_size=1`` and ``tp_size=2`` (two processes, NCCL, the custom all-reduce,
CUDA graphs; with and without the fused all-reduce + norm): a prefill of 3 sequences and 8 decode
steps, then 32 greedy tokens of 3 fresh sequences. The worst per-step relative logits error of
tp 2 against tp 1:

- float32: TP changes only the summation order (docs/perf.md: 1.5e-6 at the Llama-3-mini shape,
  2.2e-5 at Llama-3.1-8B), so the logits must agree within ``F32_TOL`` and the greedy tokens be
  identical. This is the check that shows a TP bug.
- bfloat16 (target: within 1e-2): the split matmuls round their partial sums before the
  all-reduce, so tp 2 differs from tp 1 by bf16 noise, which on random weights is about as large
  as the target (tp 1 bf16 against tp 1 float32: 1.0e-2 at the mini shape, 7e-2 at 8B). An error
  over 1e-2 but within ``BF16_NOISE_FACTOR`` times that noise is an expected failure; beyond it
  the test fails.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from gpu_helpers import CONFIGS, needs_gpus

pytestmark = needs_gpus(2)

STEPS = 8
GREEDY_STEPS = 32
LENS = [37, 100, 251]
F32_TOL = 1e-4  # 4x the worst float32 distance measured (2.2e-5, 8B shape)
BF16_TOL = 1e-2
BF16_NOISE_FACTOR = 1.5  # measured tp-2 error / bf16's own noise: 0.87-1.14
CASES = [("llama-3.1-8b", False), ("llama3-mini", False), ("llama3-mini", True)]
IDS = ["llama-3.1-8b", "llama3-mini", "llama3-mini-fused"]


def save_weights(config: str, out: str, device: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(os.path.dirname(os.path.abspath(config)))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)


def rank_main(rank: int, world: int, d: str, port: int, device: str, dtype: str, out: dict, fusion: bool = False) -> None:
    from treadle.gpu_worker.model_runner import ModelRunner, RunnerConfig
    from treadle.runtime.messages import ForwardPlan, NewSlot, PlanRow, SamplingSpec

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dev = f"cuda:{rank}" if device == "cuda" else "cpu"
    runner = ModelRunner(RunnerConfig(model_dir=d, dtype=dtype, device=dev, kv_tokens=4096, max_slots=8,
                                      context_len=512, attention_backend="triton" if device == "cuda" else "torch_native",
                                      tp_rank=rank, tp_size=world, cuda_graph_max_bs=4 if device == "cuda" else 0,
                                      custom_all_reduce=device == "cuda", allreduce_fusion=fusion))
    g = torch.Generator().manual_seed(3)
    vocab = runner.vocab_size
    seqs = [torch.randint(0, min(vocab, 40000), (n + STEPS,), generator=g).tolist() for n in LENS]
    greedy = SamplingSpec(temperature=0.0, top_k=1)
    loc, logits = 0, []
    rows = []
    for i, (s, n) in enumerate(zip(seqs, LENS)):
        rows.append(PlanRow(i, s[:n], 0, list(range(loc, loc + n))))
        loc += n
    logits.append(runner.forward_logits(ForwardPlan(step=0, new_slots=[NewSlot(i, greedy) for i in range(3)],
                                                    rows=rows)).cpu())
    for k in range(STEPS):
        rows = [PlanRow(i, [s[n + k]], n + k, [loc + i]) for i, (s, n) in enumerate(zip(seqs, LENS))]
        loc += 3
        logits.append(runner.forward_logits(ForwardPlan(step=k + 1, rows=rows)).cpu())
    # Greedy generation in fresh slots 4..6 of the same runner: each step feeds its own sample
    # back (placeholder ids), GREEDY_STEPS tokens a sequence.
    rows, ids = [], []
    for i, (s, n) in enumerate(zip(seqs, LENS)):
        rows.append(PlanRow(3 + i, s[:n], 0, list(range(loc, loc + n))))
        loc += n
    first, _ = runner.forward(ForwardPlan(step=STEPS + 1, new_slots=[NewSlot(3 + i, greedy) for i in range(3)], rows=rows))
    ids.append(first)
    for k in range(GREEDY_STEPS - 1):
        rows = [PlanRow(3 + i, [-1], n + k, [loc + i]) for i, n in enumerate(LENS)]
        loc += 3
        ids.append(runner.forward(ForwardPlan(step=STEPS + 2 + k, rows=rows))[0])
    if rank == 0:
        out[world] = (torch.stack(logits), torch.tensor(ids).T)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, d: str, device: str, dtype: str, fusion: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits ``[1 + STEPS, 3, vocab]`` teacher-forced, greedy ids ``[3, GREEDY_STEPS]``) of rank 0."""
    out = mp.Manager().dict()
    mp.spawn(rank_main, args=(world, d, free_port(), device, dtype, out, fusion), nprocs=world, join=True)
    return out[world]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Worst per-step, per-sequence relative error of the logits."""
    x, ref = x.float(), ref.float()
    return ((x - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``get(config, world, dtype, fusion)``: rank 0's (logits, greedy ids), each run once; the
    weights of a config are saved once (8B: 16 GB on disk)."""
    weights: dict[str, str] = {}
    done: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(config: str, world: int, dtype: str, fusion: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if config not in weights:
            weights[config] = str(tmp_path_factory.mktemp(f"tp-{config}"))
            save_weights(str(CONFIGS / config / "config.json"), weights[config], "cuda")
        key = (config, world, dtype, fusion and world > 1)  # one rank has nothing to fuse
        if key not in done:
            done[key] = run_world(world, weights[config], "cuda", dtype, fusion and world > 1)
        return done[key]

    return get


def compare(runs, config: str, fusion: bool, dtype: str) -> tuple[float, list[bool], str]:
    (one, one_ids), (many, many_ids) = runs(config, 1, dtype, False), runs(config, 2, dtype, fusion)
    err, same = rel_err(many, one), (one_ids == many_ids).all(dim=1).tolist()
    report = (f"{config}: tp_size=2{' (fused all-reduce + norm)' if fusion else ''} vs 1, {dtype} logits, prefill + "
              f"{STEPS} decode steps of {len(LENS)} sequences: worst relative error {err:.2e}; greedy {GREEDY_STEPS} "
              f"tokens identical in {sum(same)}/{len(same)} sequences")
    print(report)
    return err, same, report


@pytest.mark.parametrize("config,fusion", CASES, ids=IDS)
def test_float32_tp2_matches_one_rank(runs, config, fusion):
    err, same, report = compare(runs, config, fusion, "float32")
    assert all(same), report
    assert err < F32_TOL, report


@pytest.mark.parametrize("config,fusion", CASES, ids=IDS)
def test_bf16_tp2_within_bf16_noise(runs, config, fusion):
    err, _, report = compare(runs, config, fusion, "bfloat16")
    noise = rel_err(runs(config, 1, "bfloat16", False)[0], runs(config, 1, "float32", False)[0])
    report += f"; tp_size=1 bfloat16 vs tp_size=1 float32 (bf16's own noise): {noise:.2e}"
    print(report)
    if BF16_TOL <= err <= BF16_NOISE_FACTOR * noise:
        pytest.xfail(f"{report}: over {BF16_TOL:g}, within bf16's own noise on these weights")
    assert err < BF16_TOL, report
