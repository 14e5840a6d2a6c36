"""Issue 9, point 1: tensor parallelism against one rank on the same weights.

    python bench/gpu_tp_check.py --config bench/configs/llama-3.1-8b/config.json --tp 2 [--dtype bfloat16] [--device cuda]

Saves seeded random bf16 weights of the config once, then runs the same plans through
``ModelRunner`` with ``tp_size=1`` and ``tp_size=N`` (N processes, NCCL on CUDA, gloo on the
CPU): a prefill of 3 sequences and 8 decode steps (CUDA graphs on CUDA), then 32 greedy tokens of 3 fresh sequences, in bfloat16 (target:
within 1e-2) and float32 (TP changes only the summation order: about 1e-6). Prints the worst
per-step relative logits error of TP N against TP 1. On random weights bf16's own error is about
1e-2 (HF bf16 against HF float32), so the float32 number is the one that shows a TP bug.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile

import torch
import torch.multiprocessing as mp

STEPS = 8
GREEDY_STEPS = 32
LENS = [37, 100, 251]


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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", action="append", choices=["bfloat16", "float32"])
    p.add_argument("--fusion", action="store_true", help="TP N with enable_allreduce_fusion (CUDA)")
    a = p.parse_args()
    d = tempfile.mkdtemp(prefix="treadle-tp-")
    try:
        save_weights(a.config, d, a.device)
        ones = {}
        for dtype in a.dtype or ["bfloat16", "float32"]:
            (one, one_ids), (many, many_ids) = run_world(1, d, a.device, dtype), run_world(a.tp, d, a.device, dtype, a.fusion)
            ones[dtype] = one
            same = (one_ids == many_ids).all(dim=1).tolist()
            print(f"tp_size={a.tp}{' (fused all-reduce + norm)' if a.fusion else ''} vs 1, {dtype} logits, prefill + {STEPS} decode steps of {len(LENS)} sequences: "
                  f"worst relative error {rel_err(many, one):.2e}; greedy {GREEDY_STEPS} tokens identical in "
                  f"{sum(same)}/{len(same)} sequences", flush=True)
        if len(ones) == 2:  # bf16's own error on these weights: the floor a bf16 TP error is read against
            print(f"tp_size=1 bfloat16 vs tp_size=1 float32 (bf16's own noise): worst relative error "
                  f"{rel_err(ones['bfloat16'], ones['float32']):.2e}", flush=True)
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
