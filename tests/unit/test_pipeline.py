"""Pipeline parallelism and the multi-node rank layout, without engines.

The layer split, which parameters and checkpoint tensors each stage holds, the rank layout over
machines and its start-up errors; then a real two-stage pipeline (gloo, two processes) against HF.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from transformers import Qwen2Config, Qwen2ForCausalLM

from kernel_helpers import free_port

from treadle.gpu_worker import distributed
from treadle.gpu_worker.pipeline import layer_range
from treadle.runtime.parallel import dist_env, reporting_rank, results_endpoint, worker_ranks
from treadle.runtime.server_args import ServerArgs

VOCAB = 500
CFG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.08, bos_token_id=None,
           eos_token_id=None, pad_token_id=0, tie_word_embeddings=True)


# ---------------------------------------------------------------- the layer split
@pytest.mark.parametrize("layers, size, want", [
    (30, 2, [15, 15]), (30, 4, [7, 8, 8, 7]), (3, 2, [2, 1]), (5, 3, [2, 2, 1]), (4, 4, [1, 1, 1, 1]), (7, 1, [7])])
def test_layer_range_is_contiguous_even_and_spares_the_last_stage(layers, size, want):
    ranges = [layer_range(layers, r, size) for r in range(size)]
    assert [e - s for s, e in ranges] == want  # the remainder goes to the stages before the last (vLLM/SGLang)
    assert [i for s, e in ranges for i in range(s, e)] == list(range(layers))


def test_layer_range_needs_a_layer_per_stage():
    with pytest.raises(ValueError, match="pp_size 4 must be between 1 and the model's 3 layers"):
        layer_range(3, 0, 4)


# ---------------------------------------------------------------- what a stage holds
def _stage_model(monkeypatch, pp_rank: int, pp_size: int):
    """The treadle model as stage ``pp_rank`` builds it (no process group needed to build)."""
    from treadle.gpu_worker.models.llama import Qwen2ForCausalLM as Ours

    monkeypatch.setattr(distributed, "_PP_RANK", pp_rank)
    monkeypatch.setattr(distributed, "_PP_SIZE", pp_size)
    return Ours(Qwen2Config(**CFG))


def test_each_stage_builds_and_loads_only_its_part(monkeypatch):
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(**CFG))
    state = hf.state_dict()
    first, last = _stage_model(monkeypatch, 0, 2), _stage_model(monkeypatch, 1, 2)
    names0, names1 = {n for n, _ in first.named_parameters()}, {n for n, _ in last.named_parameters()}
    assert any(n.startswith("model.layers.1.") for n in names0) and "model.embed_tokens.weight" in names0
    assert not any(n.startswith(("model.layers.2.", "model.norm", "lm_head")) for n in names0)
    assert {n.split(".")[2] for n in names1 if n.startswith("model.layers.")} == {"2"}
    assert "model.norm.weight" in names1 and "lm_head.weight" in names1 and "model.embed_tokens.weight" not in names1
    # KV-cache layer ids are local to the stage
    assert [m.self_attn.attn.layer_id for m in last.model.layers[2:]] == [0]
    # the loader skips other stages' tensors unread; the last stage's tied head comes from the embedding
    read = [n for n in state if last.wants_tensor(n)]
    assert not any(".layers.0." in n or ".layers.1." in n for n in read)
    last.load_weights((n, state[n]) for n in read)
    torch.testing.assert_close(last.lm_head.weight[:VOCAB], state["model.embed_tokens.weight"])
    first.load_weights((n, state[n]) for n in state if first.wants_tensor(n))
    assert first.lm_head is None and first.model.norm is None


# ---------------------------------------------------------------- ranks over machines
def test_rank_layout_across_two_nodes():
    a = ServerArgs(tp_size=2, pp_size=2, nnodes=2, node_rank=1, dist_init_addr="127.0.0.1:29000")
    ranks = worker_ranks(a, lambda n: f"ipc:///x/{n}")
    assert [(w.rank, w.pp_rank, w.tp_rank, w.local_rank, w.local) for w in ranks] == [
        (0, 0, 0, 0, False), (1, 0, 1, 1, False), (2, 1, 0, 0, True), (3, 1, 1, 1, True)]
    assert [w.endpoint for w in ranks] == [f"tcp://127.0.0.1:{29001 + r}" for r in range(4)]
    assert results_endpoint(a, lambda n: n) == "tcp://127.0.0.1:29005"
    assert reporting_rank(a) == 2  # TP rank 0 of the last stage
    assert dist_env(a, 1234) == {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29000"}
    one = ServerArgs(pp_size=2)
    eps = [w.endpoint for w in worker_ranks(one, lambda n: f"ipc:///x/{n}")]
    assert eps == ["ipc:///x/worker0", "ipc:///x/worker1"]
    assert all(w.local for w in worker_ranks(one, str)) and dist_env(one, 1234)["MASTER_PORT"] == "1234"


def test_a_tcp_worker_exits_when_node_0_goes_away():
    """Remote ranks must not wait forever for plans from a scheduler that is gone."""
    import subprocess
    import sys

    import zmq

    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    port = push.bind_to_random_port("tcp://127.0.0.1")
    code = ("import time, zmq; from treadle.runtime.parallel import exit_when_disconnected as w; "
            f"s = zmq.Context().socket(zmq.PULL); s.connect('tcp://127.0.0.1:{port}'); w(s, 'test'); "
            "print(s.recv(), flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        push.send(b"hello")  # blocks until the child connected
        assert child.stdout.readline().strip() == b"b'hello'"
        push.close(linger=0)
        assert child.wait(timeout=20) == 0
    finally:
        child.kill()
        ctx.destroy(linger=0)


@pytest.mark.parametrize("kw, match", [
    ({"nnodes": 2, "dist_init_addr": "127.0.0.1:29000"}, "divisible by nnodes"),
    ({"nnodes": 2, "tp_size": 3, "pp_size": 1, "dist_init_addr": "127.0.0.1:29000"}, "divisible by nnodes"),
    ({"nnodes": 2, "tp_size": 2}, "dist_init_addr"),
    ({"dist_init_addr": "127.0.0.1"}, "dist_init_addr"), ({"dist_init_addr": "h:99999"}, "dist_init_addr")])
def test_bad_multinode_settings_are_value_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        ServerArgs(**kw)


def test_pp_turns_off_overlap_and_cuda_graphs():
    r = ServerArgs(device="cpu", pp_size=2).resolved()
    assert r.disable_overlap_schedule and r.disable_cuda_graph


# ---------------------------------------------------------------- a real two-stage pipeline
PROMPTS = [[5, 17, 99, 3, 250], list(range(10, 31))]


def _pp_worker(rank: int, path: str, port: int, out: str, want: list[list[int]]) -> None:
    from treadle.gpu_worker.model_runner import ModelRunner, RunnerConfig
    from treadle.runtime.messages import ForwardPlan, NewSlot, PlanRow, SamplingSpec

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    runner = ModelRunner(RunnerConfig(model_dir=path, kv_tokens=256, max_slots=4, context_len=64,
                                      dtype="float32", pp_rank=rank, pp_size=2))
    prompts = PROMPTS
    greedy = SamplingSpec(temperature=0.0)
    plan = ForwardPlan(step=0, new_slots=[NewSlot(s, greedy) for s in range(2)],
                       rows=[PlanRow(0, prompts[0], 0, list(range(5))),
                             PlanRow(1, prompts[1], 0, list(range(100, 121)))])
    ids, _ = runner.forward(plan)
    steps = [ids]
    for step in range(1, 4):  # decode HF's tokens (the scheduler would send the sampled ones to every rank)
        rows = [PlanRow(s, [want[s][step - 1]], len(prompts[s]) + step - 1, [200 + 2 * step + s]) for s in range(2)]
        steps.append(runner.forward(ForwardPlan(step=step, rows=rows))[0])
    if rank == 1:
        torch.save({"steps": steps, "info": runner.info()}, out)
    else:
        assert steps == [[]] * 4, "only the last stage samples"
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_two_stage_pipeline_matches_hf_greedy(tmp_path):
    torch.manual_seed(1)
    hf = Qwen2ForCausalLM(Qwen2Config(**CFG)).eval()  # biases and a tied head: the last stage's own copy
    path = tempfile.mkdtemp(dir=tmp_path)
    hf.save_pretrained(path)
    port = free_port()
    want = [hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=4,
                        min_new_tokens=4, do_sample=False, pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]
    out = str(tmp_path / "pp.pt")
    mp.start_processes(_pp_worker, args=(path, port, out, want), nprocs=2, start_method="spawn")
    got = torch.load(out)
    assert got["info"]["kv_layers"] == 1 and got["info"]["pp_rank"] == 1
    assert [[st[s] for st in got["steps"]] for s in range(2)] == want


# ---------------------------------------------------------------- sharded reads
def test_a_tensor_parallel_rank_reads_only_its_shard(monkeypatch, tmp_path):
    """Rank 1 of 2 loads lazily (``CheckpointTensor``): the same weights as from whole tensors,
    while the bytes read from the file are about half of the layers' weights."""
    from safetensors.torch import save_file

    from treadle.gpu_worker import loader
    from treadle.gpu_worker.models.llama import LlamaForCausalLM as Ours
    from transformers import LlamaConfig

    cfg = LlamaConfig(**{**CFG, "tie_word_embeddings": False})
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in Qwen2ForCausalLM(Qwen2Config(**CFG)).state_dict().items()
             if "bias" not in k}
    state["lm_head.weight"] = torch.randn(VOCAB, 64)
    save_file(state, str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(distributed, "_TP_RANK", 1)
    monkeypatch.setattr(distributed, "_TP_SIZE", 2)
    read = []
    narrow = loader.CheckpointTensor.narrow
    getitem = loader.CheckpointTensor.__getitem__
    monkeypatch.setattr(loader.CheckpointTensor, "narrow",
                        lambda self, *a: read.append(narrow(self, *a).numel()) or narrow(self, *a))
    monkeypatch.setattr(loader.CheckpointTensor, "__getitem__",
                        lambda self, k: read.append(getitem(self, k).numel()) or getitem(self, k))
    lazy, eager = Ours(cfg), Ours(cfg)
    lazy.load_weights(loader.iter_safetensors(str(tmp_path), progress=False, lazy=True))
    eager.load_weights(loader.iter_safetensors(str(tmp_path), progress=False))
    for (n, a), (_, b) in zip(lazy.named_parameters(), eager.named_parameters()):
        assert torch.equal(a, b), n
    total = sum(t.numel() for t in state.values())
    assert 0.45 < sum(read) / total < 0.6, sum(read) / total  # norms are replicated, the rest split
