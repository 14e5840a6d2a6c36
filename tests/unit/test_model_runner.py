"""ModelRunner against HF transformers on tiny random models (CPU, float32).

The runner must reproduce HF's logits and greedy tokens whatever the KV locations (shuffled
here on purpose), the batch composition, chunking or prefix reuse.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from kernel_helpers import Alloc, free_port

from treadle.gpu_worker.model_runner import ModelRunner, RunnerConfig
from treadle.gpu_worker.sampler import Sampler
from treadle.runtime.messages import ForwardPlan, NewSlot, PlanRow, PrefixWrite, SamplingSpec

VOCAB = 1000
KV_TOKENS = 1024
GREEDY = SamplingSpec(temperature=0.0)
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              initializer_range=0.08, bos_token_id=None, eos_token_id=None, pad_token_id=0)


def _llama():
    return LlamaForCausalLM(LlamaConfig(**COMMON))


def _qwen2():  # q/k/v bias, tied embeddings
    return Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=True))


def _llama3_rope():  # short original context so the scaling bends frequencies we actually use
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    return LlamaForCausalLM(LlamaConfig(**COMMON, rope_parameters=rope))


BUILDERS = {"llama": _llama, "qwen2": _qwen2, "llama3_rope": _llama3_rope}
_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=_CUDA)])
def device(request) -> str:
    """The runner's device; HF's reference always runs on the CPU."""
    return request.param


def tol(device: str) -> float:
    return 1e-4 if device == "cpu" else 1e-3  # different kernels (cuBLAS, SDPA) on the GPU


@pytest.fixture(scope="module")
def models():
    """name -> (HF model, saved dir); built once per module."""
    out, tmp = {}, tempfile.TemporaryDirectory()
    for i, (name, build) in enumerate(BUILDERS.items()):
        torch.manual_seed(100 + i)
        hf = build().eval()
        path = os.path.join(tmp.name, name)
        hf.save_pretrained(path)
        out[name] = (hf, path)
    yield out
    tmp.cleanup()


def make_runner(path: str, device: str = "cpu", **kw) -> ModelRunner:
    kw.setdefault("dtype", "float32")  # "auto" would pick bfloat16 on CUDA
    return ModelRunner(RunnerConfig(model_dir=path, device=device, kv_tokens=KV_TOKENS, max_slots=8,
                                    context_len=128, **kw))


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def hf_last_logits(hf, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids])).logits[0, -1].float()


@torch.no_grad()
def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


# ---------------------------------------------------------------- 1. batched prefill logits
@pytest.mark.parametrize("name", list(BUILDERS))
def test_prefill_logits_match_hf(models, name, device):
    hf, path = models[name]
    runner, alloc = make_runner(path, device), Alloc(1, KV_TOKENS)
    prompts = [prompt(n, seed=n) for n in (1, 5, 17, 40)]
    plan = ForwardPlan(step=0, new_slots=[NewSlot(s, GREEDY) for s in range(len(prompts))],
                       rows=[PlanRow(s, p, 0, alloc(len(p))) for s, p in enumerate(prompts)])
    logits = runner.forward_logits(plan)
    assert logits.shape == (len(prompts), VOCAB) and logits.dtype == torch.float32
    for row, p in zip(logits, prompts):
        torch.testing.assert_close(row.cpu(), hf_last_logits(hf, p), atol=tol(device), rtol=0)


# ---------------------------------------------------------------- 2. greedy decoding, chunking
def run_greedy(runner: ModelRunner, alloc: Alloc, prompts: dict[int, list[int]], steps: int,
               join_at: dict[int, int] | None = None) -> dict[int, list[int]]:
    """Greedy-decode every slot for ``steps`` tokens; slot s joins at step ``join_at[s]`` (default 0)."""
    join_at = join_at or {}
    out: dict[int, list[int]] = {s: [] for s in prompts}
    for step in range(steps + max(join_at.values(), default=0)):
        new, rows = [], []
        for s, p in prompts.items():
            if step == join_at.get(s, 0):
                new.append(NewSlot(s, GREEDY))
                rows.append(PlanRow(s, p, 0, alloc(len(p))))
            elif join_at.get(s, 0) < step and len(out[s]) < steps:
                rows.append(PlanRow(s, [out[s][-1]], len(p) + len(out[s]) - 1, alloc(1)))
        ids, _ = runner.forward(ForwardPlan(step=step, new_slots=new, rows=rows))
        for row, tok in zip(rows, ids):
            out[row.slot].append(tok)
    return out


@pytest.mark.parametrize("name", list(BUILDERS))
def test_greedy_alone_matches_hf_generate(models, name, device):
    hf, path = models[name]
    p = prompt(9, seed=7)
    got = run_greedy(make_runner(path, device), Alloc(2, KV_TOKENS), {0: p}, steps=20)[0]
    assert got == hf_greedy(hf, p, 20)


def test_greedy_batched_matches_hf_generate(models, device):
    hf, path = models["llama"]
    prompts = {0: prompt(3, 1), 3: prompt(12, 2), 5: prompt(25, 3), 6: prompt(1, 4)}
    # Slots 5 and 6 join while the others decode: plans mix prefill and decode rows.
    got = run_greedy(make_runner(path, device), Alloc(3, KV_TOKENS), prompts, steps=16, join_at={5: 2, 6: 5})
    for s, p in prompts.items():
        assert got[s] == hf_greedy(hf, p, 16), f"slot {s}"


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_chunked_prefill_equals_unchunked(models, name, device):
    _, path = models[name]
    runner, alloc, p = make_runner(path, device), Alloc(4, KV_TOKENS), prompt(30, seed=11)
    full = runner.forward_logits(ForwardPlan(step=0, new_slots=[NewSlot(0, GREEDY)],
                                             rows=[PlanRow(0, p, 0, alloc(30))]))
    runner.forward_logits(ForwardPlan(step=1, new_slots=[NewSlot(1, GREEDY)]))
    for step, (a, b) in enumerate([(0, 8), (8, 19), (19, 30)]):
        last = b == 30
        plan = ForwardPlan(step=2 + step, rows=[PlanRow(1, p[a:b], a, alloc(b - a), sample=last)])
        if not last:
            assert runner.forward(plan) == ([], {})
            continue
        chunked = runner.forward_logits(plan)
    torch.testing.assert_close(chunked, full, atol=tol(device), rtol=0)


# ---------------------------------------------------------------- 3. prefix reuse
def test_prefix_writes_reuse_kv(models, device):
    hf, path = models["llama"]
    runner, alloc = make_runner(path, device), Alloc(5, KV_TOKENS)
    first = prompt(20, seed=21)
    first_locs = alloc(20)
    runner.forward(ForwardPlan(step=0, new_slots=[NewSlot(0, GREEDY)], rows=[PlanRow(0, first, 0, first_locs)]))
    second = first[:12] + prompt(9, seed=22)
    plan = ForwardPlan(step=1, new_slots=[NewSlot(2, GREEDY)], prefix_writes=[PrefixWrite(2, first_locs[:12])],
                       rows=[PlanRow(2, second[12:], 12, alloc(9))])
    hit = runner.forward_logits(plan)
    torch.testing.assert_close(hit[0].cpu(), hf_last_logits(hf, second), atol=tol(device), rtol=0)
    # The first request is untouched: it keeps decoding exactly like HF.
    nxt, _ = runner.forward(ForwardPlan(step=2, rows=[PlanRow(0, [5], 20, alloc(1))]))
    assert nxt == [int(hf_last_logits(hf, first + [5]).argmax())]


# ---------------------------------------------------------------- 4. sampler
def _logits(n_rows: int = 1) -> torch.Tensor:
    base = torch.log(torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15] + [1e-4] * 45))
    return base.repeat(n_rows, 1)


def _sampler_with(specs: list[SamplingSpec], seed: int = 0) -> Sampler:
    sm = Sampler(max_slots=len(specs), device=torch.device("cpu"), seed=seed)
    for i, sp in enumerate(specs):
        sm.set_slot(i, sp)
    return sm


def test_sampler_greedy_like_settings_pick_argmax():
    specs = [SamplingSpec(temperature=0.0), SamplingSpec(top_k=1), SamplingSpec(top_p=1e-6),
             SamplingSpec(min_p=0.99), SamplingSpec(temperature=1e-7, top_p=0.5)]
    sm = _sampler_with(specs)
    logits = torch.randn(len(specs), 50, generator=torch.Generator().manual_seed(0))
    for _ in range(20):
        assert sm.sample(logits, list(range(len(specs)))).tolist() == logits.argmax(-1).tolist()


def test_sampler_filters_and_distribution():
    specs = [SamplingSpec(), SamplingSpec(top_k=2), SamplingSpec(top_p=0.75), SamplingSpec(min_p=0.5),
             SamplingSpec(temperature=0.25)]
    sm, reps = _sampler_with(specs, seed=1), 200  # each spec's slot appears ``reps`` times per call
    slots = [i for i in range(len(specs)) for _ in range(reps)]
    counts = torch.zeros(len(specs), 50)
    for _ in range(20):
        toks = sm.sample(_logits(len(slots)), slots).view(len(specs), reps)
        counts.scatter_add_(1, toks, torch.ones(toks.shape))
    freq = counts / counts.sum(1, keepdim=True)
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    assert (freq[0, :5] - probs).abs().max() < 0.04  # plain multinomial
    assert set(freq[1].nonzero().flatten().tolist()) == {1, 3}  # top-2
    assert set(freq[2].nonzero().flatten().tolist()) == {1, 3, 4}  # 0.4 + 0.3 < 0.75 -> third kept
    assert set(freq[3].nonzero().flatten().tolist()) == {1, 3}  # p >= 0.5 * 0.4
    assert freq[4, 1] > 0.6  # low temperature sharpens
    assert abs(freq[1, 1] - 4 / 7) < 0.04


def test_sampler_seeded_rows_independent_of_batch():
    seeded = SamplingSpec(temperature=1.0, seed=1234)
    alone = _sampler_with([seeded], seed=0)
    crowd = _sampler_with([SamplingSpec(), SamplingSpec(top_k=3), seeded], seed=99)
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(3))
    a = [alone.sample(logits, [0]).item() for _ in range(30)]
    b = [crowd.sample(logits.repeat(3, 1), [0, 1, 2])[2].item() for _ in range(30)]
    assert a == b and len(set(a)) > 3  # reproduces, and really samples
    crowd.set_slot(2, seeded)  # a new request with the same seed restarts the sequence
    assert [crowd.sample(logits.repeat(3, 1), [2, 1, 0])[0].item() for _ in range(30)] == a


def test_runner_seeded_sampling_independent_of_batch(models, device):
    _, path = models["llama"]
    spec = SamplingSpec(temperature=1.5, top_p=0.95, seed=42)

    def run(with_others: bool) -> list[int]:
        runner, alloc, p, toks = make_runner(path, device, random_seed=7 * with_others), Alloc(6, KV_TOKENS), prompt(6, 1), []
        others = {1: prompt(4, 2), 2: prompt(9, 3)} if with_others else {}
        new = [NewSlot(0, spec)] + [NewSlot(s, SamplingSpec(temperature=1.0)) for s in others]
        rows = [PlanRow(s, q, 0, alloc(len(q))) for s, q in others.items()] + [PlanRow(0, p, 0, alloc(6))]
        toks.append(runner.forward(ForwardPlan(step=0, new_slots=new, rows=rows))[0][-1])
        for i in range(10):
            toks.append(runner.forward(ForwardPlan(step=i + 1, rows=[PlanRow(0, [toks[-1]], 6 + i, alloc(1))]))[0][0])
        return toks

    assert run(False) == run(True)


# ---------------------------------------------------------------- 5. dummy weights, dtype, TP
def test_dummy_load_format(models, tmp_path, device):
    hf, _ = models["llama"]
    hf.config.save_pretrained(tmp_path)  # config only, no weights
    a, b = (make_runner(str(tmp_path), device, load_format="dummy") for _ in range(2))
    plan = ForwardPlan(step=0, new_slots=[NewSlot(0, GREEDY)], rows=[PlanRow(0, prompt(8, 1), 0, Alloc(7, KV_TOKENS)(8))])
    la, lb = a.forward_logits(plan), b.forward_logits(plan)
    assert torch.equal(la, lb) and torch.isfinite(la).all() and la.std() > 0
    assert 0 <= a.forward(ForwardPlan(step=1, rows=[PlanRow(0, [3], 8, [900])]))[0][0] < VOCAB
    info = a.info()
    assert info["device"].startswith(device) and info["dtype"] == "float32"
    assert info["kv_bytes"] == 2 * 3 * (KV_TOKENS + 1) * 2 * 16 * 4  # K+V, layers, tokens + 1 spare, kv heads, head dim, fp32


def test_bfloat16_runs_close_to_float32(models, device):
    hf, path = models["qwen2"]
    p = prompt(12, 5)
    plan = ForwardPlan(step=0, new_slots=[NewSlot(0, GREEDY)], rows=[PlanRow(0, p, 0, Alloc(8, KV_TOKENS)(12))])
    runner = make_runner(path, device, dtype="bfloat16")
    assert runner.info()["dtype"] == "bfloat16"
    lb = runner.forward_logits(plan)
    assert lb.dtype == torch.float32
    torch.testing.assert_close(lb[0].cpu(), hf_last_logits(hf, p), atol=0.1, rtol=0.05)


def _tp_worker(rank: int, path: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    runner = make_runner(path, tp_rank=rank, tp_size=2)
    prompts = [prompt(7, 1), prompt(15, 2)]
    alloc = Alloc(9, KV_TOKENS)
    plan = ForwardPlan(step=0, new_slots=[NewSlot(s, GREEDY) for s in range(2)],
                       rows=[PlanRow(s, p, 0, alloc(len(p))) for s, p in enumerate(prompts)])
    logits = runner.forward_logits(plan)
    # input logprobs through the vocab-parallel head, several chunks (every rank projects each one)
    import treadle.gpu_worker.logprobs as logprobs_module

    logprobs_module.INPUT_LOGPROB_CHUNK = 4
    spec = SamplingSpec(temperature=0.0, top_logprobs_num=2)
    lp_plan = ForwardPlan(step=1, new_slots=[NewSlot(2, spec)], rows=[PlanRow(2, prompts[1], 0, alloc(15), logprob_from=1)])
    _, extras = runner.forward(lp_plan)
    if rank == 0:
        torch.save((logits, extras[0].input_logprobs, extras[0].input_top_ids), out)
    # Leave together: a rank exiting while the other still holds the gloo group can abort it.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_tensor_parallel_2_matches_hf(models, tmp_path):
    hf, path = models["qwen2"]  # biases + tied vocab-parallel embedding/head
    port = free_port()
    out = str(tmp_path / "tp.pt")
    mp.start_processes(_tp_worker, args=(path, port, out), nprocs=2, start_method="spawn")
    logits, input_lps, input_top = torch.load(out)
    for row, p in zip(logits, [prompt(7, 1), prompt(15, 2)]):
        torch.testing.assert_close(row, hf_last_logits(hf, p), atol=1e-4, rtol=0)
    q = prompt(15, 2)
    ref = hf_logprobs(hf, q)[1:14]
    torch.testing.assert_close(torch.tensor(input_lps), ref[torch.arange(13), torch.tensor(q[2:])], atol=1e-4, rtol=0)
    assert input_top == ref.topk(2).indices.tolist()


# ---------------------------------------------------------------- 6. logprobs and hidden states
@torch.no_grad()
def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """log_softmax of HF's logits at every position ``[n, V]``."""
    return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)


def test_output_logprobs_match_hf(models, device):
    hf, path = models["llama"]
    runner, alloc, t = make_runner(path, device), Alloc(10, KV_TOKENS), tol(device)
    specs = {0: SamplingSpec(temperature=0.0, logprobs=True, top_logprobs_num=5, token_ids_logprob=[3, 999, 17]),
             # Sampled, with a bias and a penalty: logprobs stay those of the raw distribution.
             1: SamplingSpec(temperature=0.7, seed=3, logprobs=True, top_logprobs_num=2, logit_bias={5: 3.0},
                             repetition_penalty=1.2),
             2: SamplingSpec(temperature=1.0)}  # asks nothing
    seqs = {0: prompt(7, 31), 1: prompt(4, 32), 2: prompt(5, 33)}
    plan = ForwardPlan(step=0, new_slots=[NewSlot(s, sp) for s, sp in specs.items()],
                       rows=[PlanRow(s, q, 0, alloc(len(q))) for s, q in seqs.items()])
    for step in range(4):
        ids, extras = runner.forward(plan)
        assert sorted(extras) == [0, 1]  # row indices; the slot asking nothing gets no RowOut
        for r, s in enumerate((0, 1)):
            lp, out = hf_logprobs(hf, seqs[s])[-1], extras[r]
            assert out.logprob == pytest.approx(float(lp[ids[r]]), abs=t)
            k = specs[s].top_logprobs_num
            top = lp.topk(k)
            assert out.top_ids == top.indices.tolist()
            torch.testing.assert_close(torch.tensor(out.top_logprobs), top.values, atol=t, rtol=0)
            want_ids = lp[specs[s].token_ids_logprob or []]
            torch.testing.assert_close(torch.tensor(out.ids_logprobs), want_ids, atol=t, rtol=0)
            assert not out.input_logprobs and not out.hidden
        if step == 0:
            assert ids[0] == int(hf_logprobs(hf, seqs[0])[-1].argmax())
        rows = []
        for s, tok in zip(seqs, ids):
            rows.append(PlanRow(s, [tok], len(seqs[s]), alloc(1)))
            seqs[s] = seqs[s] + [tok]
        plan = ForwardPlan(step=step + 1, rows=rows)


def test_no_asks_no_extras(models):
    _, path = models["llama"]
    runner, p = make_runner(path), prompt(6, 1)
    ids, extras = runner.forward(ForwardPlan(step=0, new_slots=[NewSlot(0, SamplingSpec())],
                                             rows=[PlanRow(0, p, 0, Alloc(11, KV_TOKENS)(6))]))
    assert len(ids) == 1 and extras == {}


@pytest.mark.parametrize("chunk", [1024, 4])
def test_input_logprobs_match_hf(models, device, chunk, monkeypatch):
    """``chunk``: prompt positions projected at a time (4: both rows' positions span several chunks)."""
    monkeypatch.setattr("treadle.gpu_worker.logprobs.INPUT_LOGPROB_CHUNK", chunk)
    hf, path = models["llama"]
    runner, alloc, t = make_runner(path, device), Alloc(12, KV_TOKENS), tol(device)
    p, q = prompt(12, 41), prompt(9, 42)
    specs = [SamplingSpec(temperature=0.0, logprobs=True),
             SamplingSpec(temperature=0.0, top_logprobs_num=3, token_ids_logprob=[8, 2])]
    plan = ForwardPlan(step=0, new_slots=[NewSlot(0, specs[0]), NewSlot(1, specs[1])],
                       rows=[PlanRow(0, p, 0, alloc(12), logprob_from=0), PlanRow(1, q, 0, alloc(9), logprob_from=3)])
    ids, extras = runner.forward(plan)
    assert ids == [int(hf_logprobs(hf, p)[-1].argmax()), int(hf_logprobs(hf, q)[-1].argmax())]
    a, b = extras[0], extras[1]
    lp_p, lp_q = hf_logprobs(hf, p), hf_logprobs(hf, q)
    want_p = lp_p[torch.arange(11), torch.tensor(p[1:])]
    torch.testing.assert_close(torch.tensor(a.input_logprobs), want_p, atol=t, rtol=0)
    assert a.input_top_ids == [] and a.input_ids_logprobs == [] and a.logprob is not None
    want_q = lp_q[torch.arange(3, 8), torch.tensor(q[4:])]
    torch.testing.assert_close(torch.tensor(b.input_logprobs), want_q, atol=t, rtol=0)
    top = lp_q[3:8].topk(3)
    assert b.input_top_ids == top.indices.tolist()
    torch.testing.assert_close(torch.tensor(b.input_top_logprobs), top.values, atol=t, rtol=0)
    torch.testing.assert_close(torch.tensor(b.input_ids_logprobs), lp_q[3:8][:, [8, 2]], atol=t, rtol=0)
    assert b.logprob is None  # the slot did not ask for output logprobs
    # A non-final chunk (no sampling) still reports its input logprobs.
    r = ForwardPlan(step=1, new_slots=[NewSlot(2, specs[0])], rows=[PlanRow(2, p[:6], 0, alloc(6), sample=False,
                                                                            logprob_from=2)])
    ids, extras = runner.forward(r)
    assert ids == [] and list(extras) == [0]
    torch.testing.assert_close(torch.tensor(extras[0].input_logprobs), want_p[2:5], atol=t, rtol=0)


def test_hidden_states_match_hf(models, device):
    hf, path = models["llama"]
    runner, alloc, t = make_runner(path, device), Alloc(13, KV_TOKENS), tol(device)
    p = prompt(10, 51)
    spec = SamplingSpec(temperature=0.0, return_hidden=True)
    with torch.no_grad():
        out = hf(torch.tensor([p]), output_hidden_states=True)
    ref = out.hidden_states[-1][0]  # HF's last entry is after the final norm: lm_head(ref) == logits
    torch.testing.assert_close(hf.lm_head(ref), out.logits[0])
    ids, extras = runner.forward(ForwardPlan(step=0, new_slots=[NewSlot(3, GREEDY), NewSlot(4, spec)],
                                             rows=[PlanRow(3, prompt(3, 1), 0, alloc(3)), PlanRow(4, p, 0, alloc(10))]))
    assert list(extras) == [1]
    got = torch.from_numpy(np.frombuffer(extras[1].hidden, dtype=np.float32).reshape(10, -1).copy())
    torch.testing.assert_close(got, ref, atol=t, rtol=0)
    tok = ids[1]
    _, extras = runner.forward(ForwardPlan(step=1, rows=[PlanRow(4, [tok], 10, alloc(1))]))
    with torch.no_grad():
        ref2 = hf(torch.tensor([p + [tok]]), output_hidden_states=True).hidden_states[-1][0, -1]
    got2 = torch.from_numpy(np.frombuffer(extras[0].hidden, dtype=np.float32).copy())
    torch.testing.assert_close(got2, ref2, atol=t, rtol=0)


def test_readmitted_slot_continues_seeded_stream(models):
    """Same tokens whether a seeded request runs through or is re-admitted with ``prior_output``."""
    _, path = models["llama"]
    spec, p = SamplingSpec(temperature=1.3, seed=9, repetition_penalty=1.1), prompt(5, 61)

    def decode(runner, alloc, slot, ids, pos, n):
        out = []
        for i in range(n):
            tok = runner.forward(ForwardPlan(step=i, rows=[PlanRow(slot, [ids[-1]], pos + i, alloc(1))]))[0][0]
            ids, out = ids + [tok], out + [tok]
        return out

    runner, alloc = make_runner(path), Alloc(14, KV_TOKENS)
    first = runner.forward(ForwardPlan(step=0, new_slots=[NewSlot(0, spec)], rows=[PlanRow(0, p, 0, alloc(5))]))[0]
    whole = first + decode(runner, alloc, 0, p + first, 5, 11)
    runner2, alloc2 = make_runner(path, random_seed=3), Alloc(15, KV_TOKENS)
    seq = p + whole[:6]  # re-admitted after 6 tokens: recompute the whole sequence, then go on
    nxt = runner2.forward(ForwardPlan(step=0, new_slots=[NewSlot(5, spec, prior_output=whole[:6])],
                                      rows=[PlanRow(5, seq, 0, alloc2(len(seq)))]))[0]
    assert nxt + decode(runner2, alloc2, 5, seq + nxt, len(seq), 5) == whole[6:]


# ---------------------------------------------------------------- narrow KV caches (kv_cache_dtype)
def teacher_forced_logits(runner: ModelRunner) -> torch.Tensor:
    """Logits of a 20-token prefill and 4 decode steps after it (fixed tokens), ``[5, vocab]``."""
    p, alloc = prompt(20, 3), Alloc(4, KV_TOKENS)
    steps = [runner.forward_logits(ForwardPlan(step=0, new_slots=[NewSlot(0, GREEDY)],
                                               rows=[PlanRow(0, p, 0, alloc(len(p)))]))]
    for k, tok in enumerate(prompt(4, 8)):
        steps.append(runner.forward_logits(ForwardPlan(step=k + 1, rows=[PlanRow(0, [tok], len(p) + k, alloc(1))])))
    return torch.cat(steps).cpu()


def worst_rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()


@pytest.mark.parametrize("kv_dtype,torch_name,bytes_per_elem,max_rel", [
    ("bfloat16", "bfloat16", 2, 0.02), ("fp8_e4m3", "float8_e4m3fn", 1, 0.1), ("fp8_e5m2", "float8_e5m2", 1, 0.2)])
def test_narrow_kv_cache_stays_close(models, device, kv_dtype, torch_name, bytes_per_elem, max_rel):
    """K/V rounded to the cache dtype on the way in, widened for attention: prefill and decode
    logits stay near the full-precision cache's, in a pool of that many bytes."""
    _, path = models["llama"]
    ref = teacher_forced_logits(make_runner(path, device))
    runner = make_runner(path, device, kv_cache_dtype=kv_dtype)
    info = runner.info()
    assert info["kv_cache_dtype"] == torch_name
    assert info["kv_bytes"] == runner.kv_cache.buf.numel() * bytes_per_elem
    rel = worst_rel(teacher_forced_logits(runner), ref)
    assert 0 < rel < max_rel, rel


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_triton_fp8_kv_cache_stays_close(models, kv_dtype):
    """The Triton store, extend and decode kernels (graphs on) with an FP8 cache and a bf16 model."""
    _, path = models["llama"]
    logits = {kv: teacher_forced_logits(make_runner(path, "cuda", dtype="bfloat16", kv_cache_dtype=kv,
                                                    attention_backend="triton", cuda_graph_max_bs=4))
              for kv in ("auto", kv_dtype)}
    rel = worst_rel(logits[kv_dtype], logits["auto"])
    assert 0 < rel < 0.2, rel


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["llama", "qwen2"])  # qwen2: biased q/k/v projections
def test_cuda_triton_gemv_matches_cublas(models, name):
    """Batch-1 decode with the one-token Triton GEMV (PDL where the GPU has it), graphs on: float32
    greedy tokens as HF's and teacher-forced logits as cuBLAS's; bfloat16 logits near cuBLAS's."""
    hf, path = models[name]
    kw = dict(attention_backend="triton", cuda_graph_max_bs=4)
    runner = make_runner(path, "cuda", gemv_backend="triton", **kw)
    assert sum(getattr(m, "gemv_config", None) is not None for m in runner.model.modules()) > 0
    p = prompt(9, seed=7)
    assert run_greedy(runner, Alloc(2, KV_TOKENS), {0: p}, steps=20)[0] == hf_greedy(hf, p, 20)
    for dtype, max_rel in (("float32", 1e-4), ("bfloat16", 2e-2)):
        logits = {b: teacher_forced_logits(make_runner(path, "cuda", dtype=dtype, gemv_backend=b, **kw))
                  for b in ("triton", "cublas")}
        assert worst_rel(logits["triton"], logits["cublas"]) < max_rel, dtype


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pdl_changes_no_bits(models, monkeypatch):
    """Programmatic dependent launch only moves kernels' start times: bfloat16 prefill and decode
    logits (graphs on, the Triton GEMV) are bit-identical with every kernel launched plainly."""
    from treadle.gpu_worker.layers import pdl

    _, path = models["llama"]
    kw = dict(dtype="bfloat16", attention_backend="triton", cuda_graph_max_bs=4, gemv_backend="triton")
    with_pdl = teacher_forced_logits(make_runner(path, "cuda", **kw))
    monkeypatch.setattr(pdl, "ENABLED", False)
    assert torch.equal(teacher_forced_logits(make_runner(path, "cuda", **kw)), with_pdl)
