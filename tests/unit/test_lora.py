"""LoRA serving (gpu_worker/lora.py) against PEFT on a tiny random Llama (CPU, float32).

Several adapters and the base model share one batch through the real ModelRunner; every row's
logits must be PEFT's for its adapter. Also TP=2 (gloo), slot reuse, and the adapters refused.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

from kernel_helpers import free_port

from treadle.gpu_worker.lora import LoRAPool
from treadle.gpu_worker.lora_adapter import LoRAAdapter, read_adapter
from treadle.gpu_worker.model_runner import ModelRunner, RunnerConfig
from treadle.runtime.messages import ForwardPlan, NewSlot, PlanRow, SamplingSpec

peft = pytest.importorskip("peft")

VOCAB, KV_TOKENS = 1000, 1024
GREEDY = SamplingSpec(temperature=0.0)
CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              initializer_range=0.08, bos_token_id=None, eos_token_id=None, pad_token_id=0)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> LoraConfig kwargs
ADAPTERS = {"all8": dict(r=8, lora_alpha=16, target_modules=ALL),
            "qvd4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
            "rs16": dict(r=16, lora_alpha=8, use_rslora=True,
                         target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"]),
            "big32": dict(r=32, lora_alpha=32, target_modules=["q_proj"]),
            "head": dict(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])}


@pytest.fixture(scope="module")
def setup():
    """(dir of the base model, {adapter name: dir}), built once."""
    tmp = tempfile.TemporaryDirectory()
    torch.manual_seed(0)
    base = os.path.join(tmp.name, "base")
    LlamaForCausalLM(LlamaConfig(**CONFIG)).save_pretrained(base)
    dirs = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        torch.manual_seed(10 + i)
        model = peft.get_peft_model(LlamaForCausalLM.from_pretrained(base),
                                    peft.LoraConfig(init_lora_weights=False, **kw))
        dirs[name] = os.path.join(tmp.name, name)
        model.save_pretrained(dirs[name])
    yield base, dirs
    tmp.cleanup()


@torch.no_grad()
def ref_logits(base: str, adapter: str | None, ids: list[int]) -> torch.Tensor:
    """PEFT's (or, ``adapter`` None, HF's) last-position logits."""
    model = LlamaForCausalLM.from_pretrained(base)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter)
    return model.eval()(torch.tensor([ids])).logits[0, -1].float()


def make_runner(path: str, device: str = "cpu", **kw) -> ModelRunner:
    return ModelRunner(RunnerConfig(model_dir=path, device=device, dtype="float32", kv_tokens=KV_TOKENS, max_slots=8,
                                    context_len=128, attention_backend="triton" if device == "cuda" else "torch_native",
                                    **kw))


def make_pool(runner: ModelRunner) -> LoRAPool:
    return LoRAPool(runner.model, num_slots=4, max_rank=16, device=runner.device, dtype=torch.float32)


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def locs(seed: int):
    free = list(range(KV_TOKENS))
    random.Random(seed).shuffle(free)
    return lambda n: [free.pop() for _ in range(n)]


def prefill(runner: ModelRunner, pool: LoRAPool, prompts: list[list[int]], slots: list[int], seed: int = 0,
            step: int = 0) -> torch.Tensor:
    """Last-position logits of one prefill of all ``prompts``, row i on adapter slot ``slots[i]``."""
    alloc = locs(seed)
    plan = ForwardPlan(step=step, new_slots=[NewSlot(i, GREEDY) for i in range(len(prompts))],
                       rows=[PlanRow(i, p, 0, alloc(len(p))) for i, p in enumerate(prompts)])
    pool.set_token_slots(torch.tensor([s for p, s in zip(prompts, slots) for _ in p]))
    return runner.forward_logits(plan)


# ---------------------------------------------------------------- reading adapters
def test_read_adapter(setup):
    _, dirs = setup
    ad = read_adapter(dirs["all8"])
    assert ad.rank == 8 and ad.scaling == 2.0 and len(ad.weights) == 3 * 7
    a, b = ad.weights[(1, "gate_proj")]
    assert a.shape == (8, 64) and b.shape == (160, 8) and a.dtype == torch.float32
    assert read_adapter(dirs["rs16"]).scaling == pytest.approx(8 / 4)  # alpha / sqrt(r)


def _broken_copy(src: str, dst: str, **cfg) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "adapter_config.json")
    with open(path) as f:
        data = json.load(f)
    with open(path, "w") as f:
        json.dump({**data, **cfg}, f)
    return dst


@pytest.mark.parametrize("cfg, match", [(dict(use_dora=True), "DoRA"), (dict(bias="all"), "bias"),
                                        (dict(rank_pattern={"q_proj": 2}), "rank_pattern"),
                                        (dict(alpha_pattern={"q_proj": 2}), "alpha_pattern"),
                                        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
                                        (dict(target_modules=["q_proj", "embed_tokens"]), "embed_tokens")])
def test_read_adapter_refuses_unsupported_configs(setup, tmp_path, cfg, match):
    with pytest.raises(ValueError, match=match):
        read_adapter(_broken_copy(setup[1]["qvd4"], str(tmp_path / "bad"), **cfg))


def test_read_adapter_refuses_lm_head_and_missing_files(setup, tmp_path):
    with pytest.raises(ValueError, match="lm_head"):
        read_adapter(setup[1]["head"])
    with pytest.raises(ValueError, match="adapter_config.json"):
        read_adapter(str(tmp_path))
    bad = _broken_copy(setup[1]["qvd4"], str(tmp_path / "noweights"))
    os.remove(os.path.join(bad, "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="adapter_model"):
        read_adapter(bad)


def test_read_adapter_bin(setup, tmp_path):
    """Older PEFT saves ``adapter_model.bin`` (a torch pickle) instead of safetensors."""
    from safetensors.torch import load_file

    d = _broken_copy(setup[1]["qvd4"], str(tmp_path / "bin"))
    st = os.path.join(d, "adapter_model.safetensors")
    torch.save(load_file(st), os.path.join(d, "adapter_model.bin"))
    os.remove(st)
    got, want = read_adapter(d), read_adapter(setup[1]["qvd4"])
    assert got.weights.keys() == want.weights.keys()
    assert all(torch.equal(got.weights[k][1], want.weights[k][1]) for k in want.weights)


# ---------------------------------------------------------------- serving through the runner
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_mixed_batch_matches_peft(setup, device):
    base, dirs = setup
    runner = make_runner(base, device)
    pool = make_pool(runner)
    for slot, name in [(0, "all8"), (2, "qvd4"), (3, "rs16")]:
        pool.load(slot, read_adapter(dirs[name]))
    prompts = [prompt(n, seed=n) for n in (6, 11, 3, 17, 9)]
    cases = [(0, "all8"), (-1, None), (2, "qvd4"), (3, "rs16"), (1, None)]  # slot 1 is empty: the base model
    logits = prefill(runner, pool, prompts, [s for s, _ in cases])
    base_row = ref_logits(base, None, prompts[0])
    logits = logits.cpu()
    for row, p, (_, name) in zip(logits, prompts, cases):
        want = ref_logits(base, dirs[name] if name else None, p)
        torch.testing.assert_close(row, want, atol=1e-4 if device == "cpu" else 1e-3, rtol=0)
    assert (logits[0] - base_row).abs().max() > 1e-2  # the adapters do change the output


def test_decode_step_matches_peft(setup):
    """Decode rows (one token each, attending to the cached prompt) on different adapters."""
    base, dirs = setup
    runner = make_runner(base)
    pool = make_pool(runner)
    pool.load(1, read_adapter(dirs["all8"]))
    pool.load(2, read_adapter(dirs["rs16"]))
    prompts, slots, alloc = [prompt(8, 1), prompt(5, 2), prompt(12, 3)], [1, -1, 2], locs(3)
    pool.set_token_slots(torch.tensor([s for p, s in zip(prompts, slots) for _ in p]))
    runner.forward_logits(ForwardPlan(step=0, new_slots=[NewSlot(i, GREEDY) for i in range(3)],
                                      rows=[PlanRow(i, p, 0, alloc(len(p))) for i, p in enumerate(prompts)]))
    nxt = [7, 8, 9]
    pool.set_token_slots(torch.tensor(slots))
    logits = runner.forward_logits(ForwardPlan(step=1, rows=[PlanRow(i, [t], len(p), alloc(1))
                                                             for i, (p, t) in enumerate(zip(prompts, nxt))]))
    for row, p, t, name in zip(logits, prompts, nxt, ["all8", None, "rs16"]):
        torch.testing.assert_close(row, ref_logits(base, dirs[name] if name else None, p + [t]), atol=1e-4, rtol=0)


def test_slot_reuse_and_clear(setup):
    base, dirs = setup
    runner = make_runner(base)
    pool = make_pool(runner)
    p = prompt(10, seed=5)
    pool.load(1, read_adapter(dirs["all8"]))
    pool.load(1, read_adapter(dirs["qvd4"]))  # replaces all of it: smaller rank, fewer modules
    torch.testing.assert_close(prefill(runner, pool, [p], [1])[0], ref_logits(base, dirs["qvd4"], p), atol=1e-4, rtol=0)
    pool.clear(1)
    assert pool.scalings[1] == 0
    torch.testing.assert_close(prefill(runner, pool, [p], [1], step=1)[0], ref_logits(base, None, p), atol=1e-4,
                               rtol=0)
    pool.set_token_slots(torch.tensor([-1] * len(p)))
    assert pool.mask is None  # all base: the layers skip the delta


def test_load_refuses_bad_adapters(setup):
    base, dirs = setup
    pool = make_pool(make_runner(base))
    with pytest.raises(ValueError, match="max_rank"):
        pool.load(0, read_adapter(dirs["big32"]))
    ad = read_adapter(dirs["qvd4"])
    a, b = ad.weights[(2, "down_proj")]
    wrong = LoRAAdapter(ad.rank, ad.scaling, {**ad.weights, (2, "down_proj"): (a[:, :100], b)}, "wrong")
    with pytest.raises(ValueError, match="layer 2 down_proj"):
        pool.load(0, wrong)
    with pytest.raises(ValueError, match="layer 7"):
        pool.load(0, LoRAAdapter(ad.rank, ad.scaling, {(7, "q_proj"): ad.weights[(0, "q_proj")]}, "deep"))
    with pytest.raises(ValueError, match="slot"):
        pool.load(4, ad)
    assert all(sub.a.abs().sum() == 0 for sub in pool.subs.values())  # nothing half-loaded


# ---------------------------------------------------------------- tensor parallelism
def _tp_worker(rank: int, base: str, adapters: list[str], port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    runner = make_runner(base, tp_rank=rank, tp_size=2)
    pool = make_pool(runner)
    for slot, path in enumerate(adapters):
        pool.load(slot, read_adapter(path))
    logits = prefill(runner, pool, [prompt(7, 1), prompt(4, 2), prompt(12, 3)], [0, -1, 1])
    if rank == 0:
        torch.save(logits, out)
    torch.distributed.barrier()  # leave together (see test_model_runner)
    torch.distributed.destroy_process_group()


def test_tensor_parallel_2_matches_peft(setup, tmp_path):
    base, dirs = setup
    out = str(tmp_path / "tp.pt")
    mp.start_processes(_tp_worker, args=(base, [dirs["all8"], dirs["rs16"]], free_port(), out), nprocs=2,
                       start_method="spawn")
    logits = torch.load(out)
    for row, p, name in zip(logits, [prompt(7, 1), prompt(4, 2), prompt(12, 3)], ["all8", None, "rs16"]):
        torch.testing.assert_close(row, ref_logits(base, dirs[name] if name else None, p), atol=1e-4, rtol=0)


def _tp_load_worker(rank: int, base: str, good: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    runner = make_runner(base, tp_rank=rank, tp_size=2, lora_slots=2, lora_rank=16)
    results: list = []
    for i, path in enumerate((good, good if rank == 0 else good + "-missing-on-rank-1")):
        try:
            runner.load_lora(f"a{i}", path)
            results.append("ok")
        except ValueError as e:
            results.append(str(e))
    results.append(sorted(runner.lora_adapters))
    torch.save(results, f"{out}.{rank}")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_tensor_parallel_load_fails_on_every_rank_if_one_fails(setup, tmp_path):
    """An adapter one rank cannot read is loaded by none: the ranks never disagree about it."""
    base, dirs = setup
    out = str(tmp_path / "load")
    mp.start_processes(_tp_load_worker, args=(base, dirs["all8"], free_port(), out), nprocs=2, start_method="spawn")
    rank0, rank1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert rank0[0] == rank1[0] == "ok"
    assert "failed on worker rank 1" in rank0[1] and "missing-on-rank-1" in rank1[1]
    assert rank0[2] == rank1[2] == ["a0"]


def test_pool_with_fewer_target_modules(setup):
    """``lora_target_modules`` gives device buffers to those projections only; adapters within them
    still match PEFT, adapters touching others are refused by name."""
    base, dirs = setup
    runner = make_runner(base)
    pool = LoRAPool(runner.model, num_slots=2, max_rank=16, device="cpu", dtype=torch.float32,
                    targets=("q_proj", "v_proj", "down_proj"))
    assert {hf for _, hf in pool.subs} == {"q_proj", "v_proj", "down_proj"}
    assert "lora" not in runner.model.model.layers[0].mlp.gate_up_proj.__dict__
    pool.load(1, read_adapter(dirs["qvd4"]))
    ids = prompt(9, seed=5)
    got = prefill(runner, pool, [ids], [1])[0]
    assert torch.allclose(got, ref_logits(base, dirs["qvd4"], ids), atol=1e-4)
    with pytest.raises(ValueError, match="adapts (k|o|gate|up)_proj, which is not among the engine's lora_target"):
        pool.check(read_adapter(dirs["rs16"]))


def test_graph_mask_equals_the_eager_mask(setup):
    """The mask a captured decode step computes from the static slot buffer is the eager one,
    padding rows (-1) included."""
    base, dirs = setup
    pool = make_pool(make_runner(base))
    pool.load(1, read_adapter(dirs["all8"]))
    pool.load(3, read_adapter(dirs["rs16"]))
    pool.graph_buffers(8)
    pool.static_slots[:5].copy_(torch.tensor([1, -1, 3, 1, -1]))
    pool.graph_mask(6)
    graph_mask = pool.mask
    pool.set_token_slots(torch.tensor([1, -1, 3, 1, -1, -1]))
    assert torch.equal(graph_mask, pool.mask)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_matches_peft(setup):
    """A runner with LoRA slots and decode CUDA graphs: adapters arrive through plan ``lora_loads``,
    rows carry their slot, and the padded graph replay (3 rows in the graph of 4) gives peft's logits."""
    from treadle.runtime.messages import LoraLoad

    base, dirs = setup
    runner = make_runner(base, "cuda", lora_slots=4, lora_rank=16, cuda_graph_max_bs=4)
    assert runner.graphs is not None and runner.lora is not None
    for name in ("all8", "rs16"):
        runner.load_lora(name, dirs[name])
    prompts, slots, names = [prompt(8, 1), prompt(5, 2), prompt(12, 3)], [1, -1, 2], ["all8", None, "rs16"]
    alloc = locs(3)
    runner.forward_logits(ForwardPlan(
        step=0, new_slots=[NewSlot(i, GREEDY) for i in range(3)], lora_loads=[LoraLoad(1, "all8"), LoraLoad(2, "rs16")],
        rows=[PlanRow(i, p, 0, alloc(len(p)), lora_slot=s) for i, (p, s) in enumerate(zip(prompts, slots))]))
    seqs = [list(p) for p in prompts]
    for step, nxt in enumerate(([7, 8, 9], [10, 11, 12])):
        logits = runner.forward_logits(ForwardPlan(step=1 + step, rows=[
            PlanRow(i, [t], len(q), alloc(1), lora_slot=s) for i, (q, t, s) in enumerate(zip(seqs, nxt, slots))]))
        for q, t in zip(seqs, nxt):
            q.append(t)
        for row, q, name in zip(logits.cpu(), seqs, names):
            torch.testing.assert_close(row, ref_logits(base, dirs[name] if name else None, q), atol=1e-3, rtol=0)
