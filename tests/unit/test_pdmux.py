"""PD multiplexing (``enable_pdmux``, gpu_worker/pdmux.py): which rows form the decode nano-batch,
the merge back into plan row order, the runner's split path against its joint path, the
scheduler's prefill budget beside decode rows, and the argument refusals."""

from __future__ import annotations

import contextlib
import random
import tempfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kernel_helpers import Alloc

from treadle.gpu_worker.forward_context import ForwardContext, forward_context
from treadle.gpu_worker.logprobs import step_output
from treadle.gpu_worker.model_runner import ModelRunner, RunnerConfig
from treadle.gpu_worker.pdmux import joint_reason, merge, split_rows
from treadle.gpu_worker.step_inputs import PlanLimits, flatten_plan, indices_to_device
from treadle.runtime.messages import (
    PLACEHOLDER, ForwardPlan, NewSlot, PlanRow, PrefixWrite, SamplingSpec, TokenizedReq, WorkerInfo,
)
from treadle.runtime.sampling_params import SamplingParams
from treadle.runtime.server_args import ServerArgs
from treadle.scheduler_proc.scheduler import Scheduler

VOCAB, KV_TOKENS = 512, 1024
GREEDY = SamplingSpec(temperature=0.0)
_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


# ---------------------------------------------------------------- split and merge, with a fake forward
def _fake_forward(plan: ForwardPlan, specs: dict[int, SamplingSpec]):
    """A forward over ``plan`` whose outputs say where they came from: each sampling row's logits
    row is filled with its slot, each token's hidden state with its token id."""
    s = flatten_plan(plan, PlanLimits(64, 256, KV_TOKENS, VOCAB), specs.__getitem__, extras=True, report=True,
                     takes_images=False, model_name="fake", lora=False)
    dev = indices_to_device(s, "cpu")
    hidden = torch.tensor(s.token_ids, dtype=torch.float32)[:, None].expand(-1, 4)
    logits = torch.tensor(s.sample_slots, dtype=torch.float32)[:, None].expand(-1, 3)
    return step_output(s, dev, hidden, logits, True)


def test_split_and_merge_keep_plan_order():
    rnd, alloc = random.Random(5), Alloc(3, KV_TOKENS)
    rows, specs = [], {}
    for slot in range(24):  # a shuffled mix of decode and prefill rows, some needing the joint-batch extras
        kind = rnd.choice(["decode", "decode", "prompt", "chunk", "input_lps", "hidden_decode"])
        n = 1 if kind in ("decode", "hidden_decode") else rnd.randint(2, 9)
        specs[slot] = SamplingSpec(temperature=0.0, return_hidden=kind == "hidden_decode")
        ids = [PLACEHOLDER] if kind == "decode" else [rnd.randrange(1, VOCAB) for _ in range(n)]
        rows.append(PlanRow(slot, ids, 10 + slot, alloc(n), sample=kind != "chunk",
                            logprob_from=0 if kind == "input_lps" else -1))
    plan = ForwardPlan(step=1, prefix_writes=[PrefixWrite(3, alloc(10))], rows=rows)
    split = split_rows(plan, specs.__getitem__)
    decode = [i for i, r in enumerate(rows) if len(r.input_ids) == 1 and not specs[r.slot].return_hidden]
    assert split.decode == decode and split.prefill == [i for i in range(len(rows)) if i not in decode]
    dec_plan, pre_plan = split.plans(plan)
    assert dec_plan.prefix_writes == [] and pre_plan.prefix_writes == plan.prefix_writes
    merged = merge(split, _fake_forward(dec_plan, specs), _fake_forward(pre_plan, specs))
    sampling = [i for i, r in enumerate(rows) if r.sample]
    assert merged.sample_rows == sampling
    assert merged.logits[:, 0].tolist() == [rows[i].slot for i in sampling]  # each logits row its own row's
    assert merged.sample_slots == merged.sample_slots_t.tolist() == [rows[i].slot for i in sampling]
    assert [r for r, _, _ in merged.inputs] == [i for i, r in enumerate(rows) if r.logprob_from >= 0]
    assert [n for _, _, n in merged.inputs] == [len(rows[r].input_ids) - 1 for r, _, _ in merged.inputs]
    assert [r for r, _, _ in merged.hidden_rows] == [i for i, r in enumerate(rows) if specs[r.slot].return_hidden]
    for r, a, n in merged.hidden_rows:  # the hidden states of the row's own tokens
        assert merged.hidden[a:a + n, 0].tolist() == rows[r].input_ids
    # prefill rows that project nothing (middle chunks): the decode rows' logits alone
    only = merge(split, _fake_forward(dec_plan, specs), None)
    assert only.sample_rows == decode and only.logits[:, 0].tolist() == [rows[i].slot for i in decode]


def test_no_split_without_both_kinds():
    alloc = Alloc(1, KV_TOKENS)
    decodes = [PlanRow(s, [PLACEHOLDER], 5, alloc(1)) for s in range(3)]
    prompts = [PlanRow(s, [1, 2, 3], 0, alloc(3)) for s in range(3, 5)]
    specs = {s: GREEDY for s in range(5)}
    assert split_rows(ForwardPlan(step=1, rows=decodes), specs.__getitem__) is None
    assert split_rows(ForwardPlan(step=1, rows=prompts), specs.__getitem__) is None
    assert split_rows(ForwardPlan(step=1, rows=decodes + prompts), specs.__getitem__) is not None


# ---------------------------------------------------------------- the runner: split against joint
@pytest.fixture(scope="module")
def llama_dir():
    tmp = tempfile.TemporaryDirectory()
    torch.manual_seed(11)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.08, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    LlamaForCausalLM(cfg).eval().save_pretrained(tmp.name)
    yield tmp.name
    tmp.cleanup()


def mixed_plans() -> list[ForwardPlan]:
    """Steps where prompts (one chunked, one asking for input logprobs, a one-token one, one whose
    slot wants hidden states) arrive while others decode, rows in a mixed order. Decode rows take
    their input from the last step's sample (placeholders), so the plans do not depend on outputs."""
    alloc, rnd = Alloc(7, KV_TOKENS), random.Random(9)
    prompts = {s: [rnd.randrange(1, VOCAB) for _ in range(n)] for s, n in enumerate((5, 9, 40, 12, 1, 6))}
    pos = {s: len(p) for s, p in prompts.items()}  # each slot's next decode position

    def dec(s: int) -> PlanRow:
        pos[s] += 1
        return PlanRow(s, [PLACEHOLDER], pos[s] - 1, alloc(1))

    def new(s: int, spec: SamplingSpec = GREEDY) -> NewSlot:
        return NewSlot(s, spec)

    p2, p3 = prompts[2], prompts[3]
    out_lps = SamplingSpec(temperature=0.0, logprobs=True, top_logprobs_num=2)
    in_lps = SamplingSpec(temperature=0.0, logprobs=True, top_logprobs_num=3, token_ids_logprob=[5, 7])
    return [
        ForwardPlan(step=0, new_slots=[new(0, out_lps), new(1)],
                    rows=[PlanRow(s, prompts[s], 0, alloc(len(prompts[s]))) for s in (0, 1)]),
        ForwardPlan(step=1, new_slots=[new(2)], rows=[dec(0), PlanRow(2, p2[:30], 0, alloc(30), sample=False), dec(1)]),
        ForwardPlan(step=2, new_slots=[new(3, in_lps)],
                    rows=[PlanRow(2, p2[30:], 30, alloc(10)), dec(0), PlanRow(3, p3, 0, alloc(12), logprob_from=0),
                          dec(1)]),
        ForwardPlan(step=3, new_slots=[new(4), new(5, SamplingSpec(temperature=0.0, return_hidden=True))],
                    rows=[dec(0), PlanRow(4, prompts[4], 0, alloc(1)), dec(1), dec(2), PlanRow(5, prompts[5], 0, alloc(6)),
                          dec(3)]),
        ForwardPlan(step=4, rows=[dec(5), dec(0), dec(1), dec(2), dec(3), dec(4)]),
        ForwardPlan(step=5, rows=[dec(s) for s in range(6)]),
    ]


MIXED_STEPS = 5  # steps 1-5 of mixed_plans() have decode and prefill rows (slot 5's decode rows want hidden states)


def run_plans(runner: ModelRunner) -> list:
    return [runner.forward(plan) for plan in mixed_plans()]


def assert_same_results(got: list, want: list, atol: float) -> None:
    for step, ((ids, outs), (ids_w, outs_w)) in enumerate(zip(got, want)):
        assert ids == ids_w, step
        assert outs.keys() == outs_w.keys(), step
        for r, o in outs.items():
            w = outs_w[r]
            for name in ("top_ids", "input_top_ids"):
                assert getattr(o, name) == getattr(w, name), (step, r, name)
            for name in ("logprob", "top_logprobs", "ids_logprobs", "input_logprobs", "input_top_logprobs",
                         "input_ids_logprobs"):
                a, b = getattr(o, name), getattr(w, name)
                assert (a is None) == (b is None), (step, r, name)
                if a is not None:
                    np.testing.assert_allclose(np.array(a, dtype=float), np.array(b, dtype=float), atol=atol, rtol=0)
            if w.hidden:
                np.testing.assert_allclose(np.frombuffer(o.hidden, np.float32), np.frombuffer(w.hidden, np.float32),
                                           atol=atol, rtol=0)
            else:
                assert not o.hidden


def make_runner(path: str, device: str, **kw) -> ModelRunner:
    return ModelRunner(RunnerConfig(model_dir=path, device=device, dtype="float32", kv_tokens=KV_TOKENS, max_slots=8,
                                    context_len=128, **kw))


def test_split_matches_joint_on_cpu(llama_dir):
    """Sampled ids and every RowOut (output and input logprobs, hidden states) as the joint path's."""
    joint = make_runner(llama_dir, "cpu")
    split = make_runner(llama_dir, "cpu", pdmux=True)
    want = run_plans(joint)
    got = run_plans(split)
    assert split.pdmux.steps == MIXED_STEPS and split.pdmux.joint_steps == 0
    assert got[2][1][2].input_logprobs and got[3][1][4].hidden  # the extras were there to compare
    assert_same_results(got, want, atol=1e-5)


class _EagerGraphs:
    """Stands in for ``DecodeGraphs`` on the CPU: ``replay``'s arguments run as an eager decode batch."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def replay(self, input_ids, positions, locs, slots, lora_slots=None):
        r, n = self.runner, input_ids.shape[0]
        ctx = ForwardContext(input_ids=input_ids, positions=positions, out_cache_loc=locs, slots=slots.tolist(),
                             starts=positions.tolist(), extend_lens=[1] * n, logits_indices=torch.arange(n),
                             req_to_token=r.req_to_token, kv_cache=r.kv_cache, attn_backend=r.attn_backend)
        ctx.attn_meta = r.attn_backend.init_forward(ctx)
        with forward_context(ctx):
            hidden = r.model(input_ids)
            return hidden, r.model.compute_logits(hidden)


class _Stream:
    def __init__(self) -> None:
        self.waited = 0

    def wait_stream(self, other) -> None:
        self.waited += 1


def test_stream_path_plumbing_on_cpu(llama_dir, monkeypatch):
    """The CUDA path's code (graph replay of the decode rows, joins) with a stand-in graph and
    streams, so the CPU suite runs it: the joint path's results."""
    want = run_plans(make_runner(llama_dir, "cpu"))
    split = make_runner(llama_dir, "cpu", pdmux=True)
    main, side = _Stream(), _Stream()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    split.graphs, split.pdmux.decode_stream = _EagerGraphs(split), side
    got = run_plans(split)
    assert split.pdmux.steps == MIXED_STEPS and side.waited == main.waited == MIXED_STEPS
    assert_same_results(got, want, atol=1e-5)


@pytest.mark.parametrize("decode_sms", [0, 16])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=_CUDA)])
def test_split_matches_joint_on_cuda_streams(llama_dir, device, decode_sms):
    """The stream path: decode rows through the CUDA graph on a side stream (or a green context's),
    prefill rows eagerly meanwhile; the same results as the joint path within float32 kernel noise."""
    if decode_sms:
        from torch.cuda import green_contexts
        if not getattr(green_contexts, "SUPPORTED", True) or not hasattr(green_contexts.GreenContext, "Stream"):
            pytest.skip("this torch has no green contexts with streams")
    kw = dict(attention_backend="triton", cuda_graph_max_bs=8)
    want = run_plans(make_runner(llama_dir, device, **kw))
    split = make_runner(llama_dir, device, pdmux=True, pdmux_decode_sms=decode_sms, **kw)
    assert split.graphs is not None and split.pdmux.decode_stream is not None
    got = run_plans(split)
    torch.cuda.synchronize()
    assert split.pdmux.steps == MIXED_STEPS and split.pdmux.joint_steps == 0
    assert_same_results(got, want, atol=1e-3)


def test_lora_steps_run_joint(llama_dir):
    runner = make_runner(llama_dir, "cpu", pdmux=True, lora_slots=2, lora_rank=4)
    assert runner.pdmux.joint_reason == "LoRA steps run joint"  # decided once, at construction
    run_plans(runner)
    assert runner.pdmux.steps == 0 and runner.pdmux.joint_steps == MIXED_STEPS


@pytest.mark.parametrize("fact, reason", [
    ({"lora": object()}, "LoRA"), ({"pp": object()}, "pipeline"), ({"draft": object()}, "speculative"),
    ({"deterministic": True}, "deterministic"), ({}, None)])
def test_joint_reason_from_the_runner_facts(fact, reason):
    runner = SimpleNamespace(lora=fact.get("lora"), pp=fact.get("pp"), draft=fact.get("draft"),
                             cfg=SimpleNamespace(deterministic=fact.get("deterministic", False)))
    got = joint_reason(runner)
    assert got is None if reason is None else reason in got


def test_dropped_graphs_are_seen_per_step(llama_dir, monkeypatch):
    """The graphs are not fixed (release_memory_occupation drops them, the resume captures them
    again): a runner that needs them (CUDA; the stream path's stand-ins here) splits while they
    are there and runs its mixed steps joint once they are gone; the results stay the joint path's."""
    want = run_plans(make_runner(llama_dir, "cpu"))
    runner = make_runner(llama_dir, "cpu", pdmux=True)
    assert runner.pdmux.joint_reason is None
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    graphs = _EagerGraphs(runner)
    graphs.fits = lambda n: True
    runner.pdmux.needs_graph, runner.pdmux.decode_stream, runner.graphs = True, _Stream(), graphs
    plans = mixed_plans()
    got = [runner.forward(plan) for plan in plans[:3]]  # steps 1 and 2 are mixed
    assert runner.pdmux.steps == 2 and runner.pdmux.joint_steps == 0
    runner.graphs = None  # as after release_memory_occupation
    got += [runner.forward(plan) for plan in plans[3:]]
    assert runner.pdmux.steps == 2 and runner.pdmux.joint_steps == MIXED_STEPS - 2
    assert_same_results(got, want, atol=1e-5)


# ---------------------------------------------------------------- the scheduler's budget beside decode rows
class _Tokenizer:
    def decode(self, ids, skip_special_tokens=False):
        return "x" * len(ids)


def prefill_beside_decode(**kw) -> list[tuple[bool, int]]:
    """(decode rows in the step, its prefill tokens) for each step of a 150-token prompt arriving
    while a short request decodes."""
    args = ServerArgs(device="cpu", random_seed=0, disable_radix_cache=True, chunked_prefill_size=32, **kw).resolved()
    s = Scheduler(args, _Tokenizer(), set(), WorkerInfo(context_len=256, kv_tokens=512, max_slots=4, vocab_size=1 << 62))

    def req(rid: str, n: int, new: int) -> TokenizedReq:
        return TokenizedReq(rid=rid, input_ids=[3] * n, sampling=SamplingParams(max_new_tokens=new, ignore_eos=True))

    s.add_requests([req("short", 6, 12)])
    steps = []
    while True:
        if s.step == 1:
            s.add_requests([req("long", 150, 2)])
        plan = s.schedule()
        if plan is None:
            break
        steps.append((any(not b.prefill for b in s.plan_rows), sum(b.num_tokens for b in s.plan_rows if b.prefill)))
        s.apply_result([5] * sum(r.sample for r in plan.rows))
        s.take_outputs()
    return steps


def test_pdmux_bounds_the_prefill_beside_decode_rows():
    plain = prefill_beside_decode()
    assert max(n for dec, n in plain if dec) == 32  # the chunk size, decode rows or not
    steps = prefill_beside_decode(enable_pdmux=True, pdmux_prefill_tokens=8)
    assert max(n for dec, n in steps if dec) == 8
    assert max(n for dec, n in steps if not dec) == 32  # no decode rows: the whole budget
    assert sum(n for _, n in steps) == sum(n for _, n in plain) == 156


# ---------------------------------------------------------------- arguments
@pytest.mark.parametrize("kw, field", [
    ({"pp_size": 2}, "pp_size=2"), ({"tp_size": 2}, "tp_size=2"),
    ({"speculative_algorithm": "NGRAM"}, "speculative_algorithm='NGRAM'"),
    ({"enable_deterministic_inference": True}, "enable_deterministic_inference=True"),
])
def test_refused_combinations_name_the_field(kw, field):
    with pytest.raises(ValueError, match=rf"enable_pdmux=True cannot run with {field}"):
        ServerArgs(enable_pdmux=True, **kw)
    ServerArgs(**kw)  # fine without it


@pytest.mark.parametrize("kw, field", [
    ({"enable_pdmux": True, "pdmux_prefill_tokens": 0}, "pdmux_prefill_tokens"),
    ({"enable_pdmux": True, "pdmux_decode_sms": -1}, "pdmux_decode_sms"),
    ({"pdmux_decode_sms": 16}, "pdmux_decode_sms is read only with enable_pdmux"),
    ({"enable_pdmux": 1}, "enable_pdmux must be a bool"),
])
def test_bad_values_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        ServerArgs(**kw)


def test_accepted_on_the_cpu():
    a = ServerArgs(device="cpu", enable_pdmux=True, pdmux_prefill_tokens=256).resolved()
    a.check_supported()
    assert a.enable_pdmux and ServerArgs.from_json(a.to_json()) == a
