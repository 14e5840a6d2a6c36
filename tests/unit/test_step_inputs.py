"""flatten_plan: a ForwardPlan as the index lists of one batched forward, and the plan checks (no device)."""

from __future__ import annotations

import pytest
import torch

from treadle.gpu_worker.step_inputs import (
    PlanLimits, StepInputs, check_slot, check_spec, flatten_plan, indices_to_device,
)
from treadle.runtime.messages import PLACEHOLDER, ForwardPlan, MmChunk, PlanRow, PrefixWrite, SamplingSpec

LIMITS = PlanLimits(max_slots=8, context_len=32, kv_tokens=100, vocab_size=50)
SPECS = {3: SamplingSpec(return_hidden=True), 4: SamplingSpec(embed=True)}


def spec_of(slot: int) -> SamplingSpec:
    return SPECS.get(slot, SamplingSpec())


def flatten(plan: ForwardPlan, extras: bool = True, report: bool = True, takes_images: bool = False,
            lora: bool = False) -> StepInputs:
    return flatten_plan(plan, LIMITS, spec_of, extras=extras, report=report, takes_images=takes_images,
                        model_name="TextModel", lora=lora)


def mixed_plan() -> ForwardPlan:
    """Slot 2: a prefix hit of 3 tokens, then a non-final prefill chunk asking for input logprobs
    from its second position; slot 3: a decode row whose token is still being sampled; slot 4:
    a decode row with its token; slot 5: a whole prompt that samples and asks for input logprobs."""
    return ForwardPlan(step=7, prefix_writes=[PrefixWrite(slot=2, locs=[10, 11, 12])], rows=[
        PlanRow(slot=2, input_ids=[5, 6, 7, 8], start_pos=3, new_locs=[20, 21, 22, 23], sample=False,
                logprob_from=1, lora_slot=0),
        PlanRow(slot=3, input_ids=[PLACEHOLDER], start_pos=9, new_locs=[30]),
        PlanRow(slot=4, input_ids=[9], start_pos=4, new_locs=[31]),
        PlanRow(slot=5, input_ids=[1, 2, 3], start_pos=0, new_locs=[40, 41, 42], logprob_from=0, lora_slot=1),
    ])


def test_flatten_mixed_plan():
    s = flatten(mixed_plan(), lora=True)
    assert s.token_ids == [5, 6, 7, 8, PLACEHOLDER, 9, 1, 2, 3]
    assert (s.row_slots, s.row_starts, s.row_lens) == ([2, 3, 4, 5], [3, 9, 4, 0], [4, 1, 1, 3])
    # the prefix hit's writes first (positions from 0), then every row's new tokens
    assert s.num_prefix_writes == 3
    assert s.write_slots == [2, 2, 2, 2, 2, 2, 2, 3, 4, 5, 5, 5]
    assert s.write_positions == [0, 1, 2, 3, 4, 5, 6, 9, 4, 0, 1, 2]
    assert s.write_locs == [10, 11, 12, 20, 21, 22, 23, 30, 31, 40, 41, 42]
    # the chunk does not sample: the LM head sees the last token of the other three rows
    assert s.logits_indices == [4, 5, 8]
    assert (s.sample_rows, s.sample_slots) == ([1, 2, 3], [3, 4, 5])
    # input logprobs: positions logprob_from .. n-2 of each asking row, numbered across the step
    assert s.input_logprob_rows == [(0, 0, 2), (3, 2, 2)]
    assert s.input_logprob_indices == [1, 2, 6, 7]
    # slot 3 wants every position's hidden state, slot 4 (an embedding) only the last one
    assert s.hidden_rows == [(1, 4, 1), (2, 5, 1)]
    assert (s.placeholder_indices, s.placeholder_slots) == ([4], [3])
    assert s.lora_slots == [0, 0, 0, 0, -1, -1, 1, 1, 1]
    assert s.mm_rows == []


def test_flatten_without_extras_report_or_lora():
    s = flatten(mixed_plan(), extras=False, report=False)
    assert s.input_logprob_rows == [] and s.input_logprob_indices == []
    assert s.hidden_rows == [] and s.lora_slots == []
    assert s.logits_indices == [4, 5, 8]  # the rest is as with extras
    # extras without report (a TP rank that does not send results): logprob positions, no hidden rows
    s = flatten(mixed_plan(), extras=True, report=False)
    assert s.input_logprob_indices == [1, 2, 6, 7] and s.hidden_rows == []


def test_logprob_from_at_the_last_position_asks_for_nothing():
    s = flatten(ForwardPlan(step=1, rows=[PlanRow(slot=0, input_ids=[1, 2], start_pos=0, new_locs=[0, 1],
                                                  logprob_from=1)]))
    assert s.input_logprob_rows == [(0, 0, 0)] and s.input_logprob_indices == []


def test_prefix_writes_only_and_empty_plan():
    s = flatten(ForwardPlan(step=1, prefix_writes=[PrefixWrite(slot=1, locs=[7, 8])]))
    assert (s.write_slots, s.write_positions, s.write_locs, s.num_prefix_writes) == ([1, 1], [0, 1], [7, 8], 2)
    assert s.token_ids == [] and s.logits_indices == []
    assert flatten(ForwardPlan(step=2)) == StepInputs()


def test_image_rows():
    chunk = MmChunk(item=0, offset=1, num_tokens=2)
    row = PlanRow(slot=1, input_ids=[3, 4, 4, 5], start_pos=0, new_locs=[0, 1, 2, 3], mm=[chunk])
    decode = PlanRow(slot=0, input_ids=[6], start_pos=3, new_locs=[4])
    s = flatten(ForwardPlan(step=1, rows=[decode, row]), takes_images=True)
    assert s.mm_rows == [(1, row)]  # the index of the row's first token in the step
    with pytest.raises(ValueError, match="row of slot 1 carries images, but TextModel takes text only"):
        flatten(ForwardPlan(step=1, rows=[decode, row]))


def row(**kw) -> PlanRow:
    fields = {"slot": 0, "input_ids": [1, 2], "start_pos": 0, "new_locs": [0, 1], **kw}
    return PlanRow(**fields)


@pytest.mark.parametrize("plan,match", [
    (ForwardPlan(step=1, prefix_writes=[PrefixWrite(slot=8, locs=[0])]), r"slot 8 out of range \[0, 8\)"),
    (ForwardPlan(step=1, prefix_writes=[PrefixWrite(slot=0, locs=list(range(33)))]),
     "prefix of 33 tokens exceeds context_len 32"),
    (ForwardPlan(step=1, rows=[row(slot=-1)]), r"slot -1 out of range \[0, 8\)"),
    (ForwardPlan(step=1, rows=[row(new_locs=[0])]), "row of slot 0: 2 input ids but 1 new locs"),
    (ForwardPlan(step=1, rows=[row(input_ids=[], new_locs=[])]), "row of slot 0: 0 input ids but 0 new locs"),
    (ForwardPlan(step=1, rows=[row(start_pos=31)]), "row of slot 0 spans positions beyond context_len 32"),
    (ForwardPlan(step=1, rows=[row(start_pos=-1)]), "row of slot 0 spans positions beyond context_len 32"),
    (ForwardPlan(step=1, rows=[row(new_locs=[0, 100])]), r"KV location out of range \[0, 100\)"),
    (ForwardPlan(step=1, rows=[row(new_locs=[-1, 1])]), r"KV location out of range \[0, 100\)"),
    (ForwardPlan(step=1, prefix_writes=[PrefixWrite(slot=0, locs=[100])]), r"KV location out of range"),
    (ForwardPlan(step=1, rows=[row(input_ids=[1, 50])]), r"token id out of range \[0, 50\)"),
    (ForwardPlan(step=1, rows=[row(input_ids=[-2, 1])]), r"token id out of range \[0, 50\)"),
    (ForwardPlan(step=1, rows=[row(input_ids=[PLACEHOLDER, 1])]), "a placeholder in a multi-token row"),
])
def test_plan_errors(plan, match):
    with pytest.raises(ValueError, match=match):
        flatten(plan)


@pytest.mark.parametrize("spec,match", [
    (SamplingSpec(logit_bias={50: 1.0}), r"slot 3: logit_bias has a token id outside \[0, 50\)"),
    (SamplingSpec(stop_ids=[-1]), "slot 3: stop_ids has a token id outside"),
    (SamplingSpec(token_ids_logprob=[0, 99]), "slot 3: token_ids_logprob has a token id outside"),
    (SamplingSpec(top_logprobs_num=-1), "slot 3: negative top_logprobs_num"),
])
def test_spec_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        check_spec(3, spec, vocab_size=50)
    check_spec(3, SamplingSpec(logit_bias={49: 1.0}, stop_ids=[0], token_ids_logprob=[1], top_logprobs_num=2), 50)


def test_check_slot():
    check_slot(0, 8), check_slot(7, 8)
    for bad in (-1, 8):
        with pytest.raises(ValueError, match="out of range"):
            check_slot(bad, 8)


def test_indices_to_device():
    s = flatten(mixed_plan())
    dev = indices_to_device(s, "cpu")
    assert dev.input_ids.tolist() == s.token_ids
    assert dev.write_locs.tolist() == s.write_locs and dev.write_slots.tolist() == s.write_slots
    assert dev.positions.tolist() == s.write_positions[3:] and dev.locs.tolist() == s.write_locs[3:]
    assert dev.logits_indices.tolist() == [4, 5, 8] and dev.sample_slots.tolist() == [3, 4, 5]
    assert dev.placeholder_indices.tolist() == [4] and dev.placeholder_slots.tolist() == [3]
    assert all(t.dtype == torch.int64 for t in dev)
