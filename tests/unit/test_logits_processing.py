"""Slot-dependent logit edits: penalties (against HF / the OpenAI formula), logit_bias,
min_new_tokens and custom processors, batched over rows with different settings."""

from __future__ import annotations

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from treadle.gpu_worker.logits_processing import SlotState
from treadle.gpu_worker.sampler import Sampler
from treadle.runtime.messages import SamplingSpec

V = 64
FORCE = "logit_processors_for_tests:ForceToken"
_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=_CUDA)])
def dev(request) -> torch.device:
    return torch.device(request.param)


def rand_logits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def outputs(n: int, seed: int) -> list[int]:
    return torch.randint(0, V // 4, (n,), generator=torch.Generator().manual_seed(seed)).tolist()  # many repeats


def reference(logits: torch.Tensor, spec: SamplingSpec, outs: list[int]) -> torch.Tensor:
    """HF's repetition penalty, then OpenAI's frequency/presence formula, on one row."""
    x = logits.clone()[None]
    if outs and spec.repetition_penalty != 1.0:
        x = RepetitionPenaltyLogitsProcessor(spec.repetition_penalty)(torch.tensor([outs]), x)
    counts = torch.bincount(torch.tensor(outs, dtype=torch.int64), minlength=V).float()
    return (x[0] - spec.frequency_penalty * counts - spec.presence_penalty * (counts > 0).float())


PEN_SPECS = [
    SamplingSpec(),
    SamplingSpec(repetition_penalty=1.3),
    SamplingSpec(frequency_penalty=0.5, presence_penalty=0.3),
    SamplingSpec(repetition_penalty=0.8, frequency_penalty=-0.4, presence_penalty=1.1),
    SamplingSpec(temperature=0.0, presence_penalty=-0.7),
    SamplingSpec(repetition_penalty=1.7),  # no outputs yet: nothing to penalize
]


def test_penalties_match_hf_and_openai_mixed_batch(dev):
    st = SlotState(8, dev)
    outs = {s: ([] if s == 5 else outputs(10 + 3 * s, s)) for s in range(len(PEN_SPECS))}
    for s, sp in enumerate(PEN_SPECS):
        st.set_slot(s, sp, outs[s])
    slots = [3, 0, 5, 1, 4, 2, 1]  # any order, one slot twice
    logits = rand_logits(len(slots))
    got = st.apply(logits.clone().to(dev), slots).cpu()
    for i, s in enumerate(slots):
        torch.testing.assert_close(got[i], reference(logits[i], PEN_SPECS[s], outs[s]), atol=1e-5, rtol=0)
    assert torch.equal(got[1], logits[1])


def test_penalties_follow_sampled_tokens_and_prior_output(dev):
    """Greedy decoding with penalties: counts grow with every sampled token, and a slot set with
    ``prior_output`` (a re-admitted request) counts those too; checked against a from-scratch reference."""
    sm = Sampler(4, dev)
    specs = {0: SamplingSpec(temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.4),
             2: SamplingSpec(top_k=1, presence_penalty=2.0), 3: SamplingSpec(temperature=0.0)}
    prior = {0: [], 2: outputs(6, 9), 3: [1, 2]}
    for s, sp in specs.items():
        sm.set_slot(s, sp, prior[s])
    hist = {s: list(prior[s]) for s in specs}
    base = rand_logits(3, seed=4)
    for step in range(12):
        logits = base + 0.1 * rand_logits(3, seed=100 + step)
        got = sm.sample(logits.clone().to(dev), [0, 2, 3]).tolist()
        for i, s in enumerate([0, 2, 3]):
            assert got[i] == int(reference(logits[i], specs[s], hist[s]).argmax()), (step, s)
            hist[s].append(got[i])
    assert sm.state.outputs[2] == hist[2]
    assert len(set(hist[0])) > 3  # the penalties really moved the argmax around


def test_logit_bias_and_fast_path(dev):
    st = SlotState(4, dev)
    st.set_slot(0, SamplingSpec(logit_bias={3: 5.0, 60: -100.0}))
    st.set_slot(1, SamplingSpec(temperature=0.0, logit_bias={7: 2.5}))
    st.set_slot(2, SamplingSpec())
    logits = rand_logits(3)
    got = st.apply(logits.clone().to(dev), [0, 1, 2]).cpu()
    want = logits.clone()
    want[0, 3] += 5.0
    want[0, 60] -= 100.0
    want[1, 7] += 2.5
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    # Nothing to do: the very same tensor comes back and no count table is allocated.
    x = rand_logits(2).to(dev)
    assert st.apply(x, [2, 2]) is x and st.counts is None
    sm = Sampler(2, dev)
    sm.set_slot(0, SamplingSpec(temperature=0.0, logit_bias={11: 1e4}))
    assert sm.sample(rand_logits(1).to(dev), [0]).tolist() == [11]  # greedy rows see the bias


def test_min_new_tokens_masks_stop_ids_until_reached(dev):
    sm = Sampler(3, dev)
    logits = torch.zeros(1, V, device=dev)
    logits[0, 5], logits[0, 9], logits[0, 20] = 10.0, 9.0, 8.0  # 5 and 9 are stop ids
    sm.set_slot(0, SamplingSpec(temperature=0.0, min_new_tokens=3, stop_ids=[5, 9]))
    sm.set_slot(1, SamplingSpec(temperature=0.0, min_new_tokens=3, stop_ids=[5, 9]), prior_output=[1, 2])
    sm.set_slot(2, SamplingSpec(temperature=0.0, stop_ids=[5, 9]))  # no minimum
    got = [sm.sample(logits.repeat(3, 1), [0, 1, 2]).tolist() for _ in range(4)]
    assert [g[0] for g in got] == [20, 20, 20, 5]
    assert [g[1] for g in got] == [20, 5, 5, 5]  # two outputs before re-admission count
    assert [g[2] for g in got] == [5, 5, 5, 5]


def test_custom_processors_grouped_cached_and_written_back(dev):
    import logit_processors_for_tests as lp

    lp.ForceToken.calls.clear()
    builtin = "treadle.runtime.logit_processor:DisallowedTokensLogitsProcessor"
    sm = Sampler(6, dev)
    sm.set_slot(0, SamplingSpec(temperature=0.0, custom_processor=FORCE, custom_params={"token": 4}))
    sm.set_slot(1, SamplingSpec(custom_processor=FORCE, custom_state={"offset": 10}, custom_params={"token": 4}))
    sm.set_slot(2, SamplingSpec(temperature=0.0, custom_processor=FORCE, custom_params={"token": 7}),
                prior_output=[1, 2, 3])
    sm.set_slot(3, SamplingSpec(temperature=0.0))
    sm.set_slot(4, SamplingSpec(temperature=0.0, custom_processor=builtin, custom_params={"token_ids": [0]}))
    logits = torch.zeros(5, V, device=dev)
    logits[:, 0] = 5.0  # the unconstrained argmax
    for step in range(3):
        assert sm.sample(logits.clone(), [0, 1, 2, 3, 4]).tolist()[:4] == [4, 14, 7, 0]
    assert sm.sample(logits[4:].clone(), [4]).item() != 0
    # One call per (processor, state) group and step; one instance per group, reused.
    calls = lp.ForceToken.calls
    assert [rows for _, rows, _ in calls] == [2, 1] * 3
    assert len({inst for inst, _, _ in calls}) == 2
    first = calls[0][2]
    assert first == [{"token": 4, "__output_ids__": []}, {"token": 7, "__output_ids__": [1, 2, 3]}]
    assert calls[4][2][1]["__output_ids__"] == [1, 2, 3, 7, 7]


def test_custom_processor_must_subclass(dev):
    """A processor that cannot be used (or raises) fails its slots, reported, never raised here."""
    st = SlotState(2, dev)
    st.set_slot(0, SamplingSpec(custom_processor="logit_processors_for_tests:NotAProcessor"))
    logits = rand_logits(2).to(dev)
    out = st.apply(logits.clone(), [1, 0])
    failures = st.take_failures()
    assert list(failures) == [0] and "NotAProcessor failed: TypeError" in failures[0]
    assert torch.equal(out, logits) and st.take_failures() == {}
