"""EAGLE3's taps of the target's residual stream at ``tp_size=2`` (two CPU ranks, gloo): with TP the
decoder layers leave their all-reduce to the next norm, so a layer's own input is a partial sum;
the taps (``llama_eagle.tap_residual_stream``) must read the full state on every rank: the
embedding, a middle layer's input and the final norm's input, against HF's hidden states."""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

from kernel_helpers import free_port

LAYERS = 3
SHAPE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=320,
             max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6, intermediate_size=128,
             num_hidden_layers=LAYERS, initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=0)
PROMPT = torch.randint(1, 320, (11,), generator=torch.Generator().manual_seed(5)).tolist()


def _tap_worker(rank: int, path: str, port: int, out: str) -> None:
    from treadle.gpu_worker.model_runner import ModelRunner, RunnerConfig
    from treadle.gpu_worker.models.llama_eagle import tap_residual_stream
    from treadle.runtime.messages import ForwardPlan, NewSlot, PlanRow, SamplingSpec

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    runner = ModelRunner(RunnerConfig(model_dir=path, device="cpu", dtype="float32", kv_tokens=64, max_slots=2,
                                      context_len=64, attention_backend="torch_native", tp_rank=rank, tp_size=2))
    assert runner.model.model.defer_reduce  # the case the taps are for: layers hand partial sums on
    taps: list[torch.Tensor] = []
    tap_residual_stream(runner.model.model, [0, 1, LAYERS], taps.append)
    plan = ForwardPlan(step=0, new_slots=[NewSlot(0, SamplingSpec(temperature=0.0, top_k=1))],
                       rows=[PlanRow(0, PROMPT, 0, list(range(len(PROMPT))))])
    runner.forward_logits(plan)
    torch.save(torch.stack(taps), out.replace(".pt", f"{rank}.pt"))
    torch.distributed.barrier()  # leave together (a rank exiting early can abort the gloo group)
    torch.distributed.destroy_process_group()


@torch.no_grad()
def test_taps_read_the_full_residual_stream_on_every_rank(tmp_path):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    path = str(tmp_path / "target")
    hf.save_pretrained(path)
    out = str(tmp_path / "taps.pt")
    mp.start_processes(_tap_worker, args=(path, free_port(), out), nprocs=2, start_method="spawn")
    hs = hf(torch.tensor([PROMPT]), output_hidden_states=True).hidden_states  # [i]: layer i's input; [-1] normed
    for rank in range(2):
        taps = torch.load(out.replace(".pt", f"{rank}.pt"))
        torch.testing.assert_close(taps[0], hs[0][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(taps[1], hs[1][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(hf.model.norm(taps[2]), hs[-1][0], atol=1e-4, rtol=1e-4)
