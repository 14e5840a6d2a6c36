"""Logprob extras (``RowOut``) from raw logits: the sampled token's, top-k, chosen ids, input ones.

Logprobs are of the model's raw distribution, ``log_softmax`` of the LM head's logits, before
logit_bias, penalties, min_new_tokens masks, custom processors, temperature and top-k/p/min-p (the
``RowOut`` contract): they describe the model, not the sampling settings, and are the same for a
greedy and a sampled request. The sampled token is whatever the sampler drew from the edited
distribution, so its raw logprob may be low (e.g. a token forced by a bias). ``logits - logsumexp``
is used instead of a full ``log_softmax`` so a long prompt's input logprobs need no second
``[n, V]`` copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch

from treadle.gpu_worker.host_to_device import to_device
from treadle.gpu_worker.layers import batch_invariant
from treadle.runtime.messages import ForwardPlan, RowOut, SamplingSpec

if TYPE_CHECKING:
    from treadle.gpu_worker.step_inputs import DeviceIndices, StepInputs

# Prompt positions projected through the LM head at once for input logprobs: a whole 8,192-token
# chunk at a 128k vocabulary would be 4.2 GB of float32 logits; 1,024 positions are 0.5 GB.
INPUT_LOGPROB_CHUNK = 1024


@dataclass
class Gathered:
    """Per logits row: logprob of its target, top-k (ids, logprobs) best first, logprobs of chosen ids."""

    chosen: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]
    ids_logprobs: list[list[float]]


def gather_logprobs(logits: torch.Tensor, targets: torch.Tensor, top_ks: list[int],
                    id_lists: list[list[int]]) -> Gathered:
    """``logits [m, V]`` float32; ``targets [m]``; per row a top-k size (0: none) and an id list."""
    m, vocab = logits.shape
    lse = batch_invariant.logsumexp(logits) if batch_invariant.ENABLED else torch.logsumexp(logits, dim=-1)
    chosen = (logits.gather(1, targets.view(-1, 1))[:, 0] - lse).tolist()
    top_ids: list[list[int]] = [[] for _ in range(m)]
    top_lps: list[list[float]] = [[] for _ in range(m)]
    rows = [i for i, k in enumerate(top_ks) if k > 0]
    if rows:
        kmax = min(max(top_ks), vocab)
        sel = to_device(rows, torch.int64, logits.device)
        vals, idx = logits[sel].topk(kmax, dim=-1)
        vals = (vals - lse[sel, None]).tolist()
        idx = idx.tolist()
        for j, i in enumerate(rows):
            top_ids[i], top_lps[i] = idx[j][: top_ks[i]], vals[j][: top_ks[i]]
    ids_lps: list[list[float]] = [[] for _ in range(m)]
    flat = [(i, t) for i, ids in enumerate(id_lists) for t in ids]
    if flat:  # ids were range-checked when the slot was set (ModelRunner)
        rc = to_device(flat, torch.int64, logits.device)
        vals = (logits[rc[:, 0], rc[:, 1]] - lse[rc[:, 0]]).tolist()
        pos = 0
        for i, ids in enumerate(id_lists):
            ids_lps[i], pos = vals[pos : pos + len(ids)], pos + len(ids)
    return Gathered(chosen, top_ids, top_lps, ids_lps)


def input_logprobs(plan: ForwardPlan, inputs: list[tuple[int, int, int]], hidden: torch.Tensor,
                   project: Callable[[torch.Tensor], torch.Tensor], spec_of: Callable[[int], SamplingSpec],
                   report: bool) -> Gathered:
    """Input logprobs of the positions ``inputs`` name (``(plan row, first, count)``; ``hidden`` holds
    their final hidden states in that order), projected by ``project`` (the LM head, float32 logits)
    ``INPUT_LOGPROB_CHUNK`` positions at a time. Every TP rank calls it (the head all-gathers);
    only a ``report``ing rank gathers, the others get an empty result."""
    targets, top_ks, id_lists = [], [], []
    for r, _, count in inputs if report else ():
        row, spec = plan.rows[r], spec_of(plan.rows[r].slot)
        targets += row.input_ids[row.logprob_from + 1:]
        top_ks += [spec.top_logprobs_num] * count
        id_lists += [list(spec.token_ids_logprob or [])] * count
    out = Gathered([], [], [], [])
    target_t = to_device(targets, torch.int64, hidden.device) if targets else None
    for a in range(0, hidden.shape[0], INPUT_LOGPROB_CHUNK):
        b = min(a + INPUT_LOGPROB_CHUNK, hidden.shape[0])
        logits = project(hidden[a:b])
        if report:
            g = gather_logprobs(logits, target_t[a:b], top_ks[a:b], id_lists[a:b])
            out.chosen += g.chosen
            out.top_ids += g.top_ids
            out.top_logprobs += g.top_logprobs
            out.ids_logprobs += g.ids_logprobs
    return out


@dataclass
class StepOutput:
    """What one forward produced and where each plan row's part of it lies."""

    hidden: torch.Tensor  # [T, hidden] final (normed) hidden states of every token of the step
    logits: Optional[torch.Tensor]  # [S, V] raw float32 logits of the sampling rows' last positions
    sample_rows: list[int]  # plan row index of each sampling row
    sample_slots: list[int]
    inputs: list[tuple[int, int, int]]  # (plan row, first entry in ``input_lps``, count) for input logprobs
    hidden_rows: list[tuple[int, int, int]]  # (plan row, first token, count) for hidden states
    report: bool  # build RowOuts (rank 0 of a forward() call)
    sample_slots_t: Optional[torch.Tensor] = None  # ``sample_slots`` on the device
    input_lps: Optional[Gathered] = None  # the input logprobs of ``inputs`` (reporting rank)
    spec_rows: Optional[list[tuple[int, int, int]]] = None  # verify rows: their logits follow the sampling rows'


def step_output(s: "StepInputs", dev: "DeviceIndices", hidden: torch.Tensor, logits: Optional[torch.Tensor],
                report: bool, input_lps: Optional[Gathered] = None) -> StepOutput:
    """The ``StepOutput`` of one forward over the flattened step ``s`` (``dev``: its indices on the device)."""
    return StepOutput(hidden=hidden, logits=logits, sample_rows=s.sample_rows, sample_slots=s.sample_slots,
                      inputs=s.input_logprob_rows, hidden_rows=s.hidden_rows, report=report,
                      sample_slots_t=dev.sample_slots, input_lps=input_lps, spec_rows=s.spec_rows)


def row_outs(plan: ForwardPlan, step: StepOutput, spec_of: Callable[[int], SamplingSpec], want: list[int],
             raw: Optional[torch.Tensor], ids: Optional[torch.Tensor]) -> dict[int, RowOut]:
    """RowOuts by plan row index. ``want``: sampling rows (indices into ``step.sample_rows``) that
    report output logprobs, ``raw`` their unedited logits, ``ids`` all sampled ids."""
    out: dict[int, RowOut] = {}
    if want:
        specs = [spec_of(step.sample_slots[j]) for j in want]
        sel = to_device(want, torch.int64, ids.device)
        g = gather_logprobs(raw, ids[sel], [sp.top_logprobs_num for sp in specs],
                            [list(sp.token_ids_logprob or []) for sp in specs])
        for k, j in enumerate(want):
            out[step.sample_rows[j]] = RowOut(logprob=g.chosen[k], top_ids=g.top_ids[k],
                                              top_logprobs=g.top_logprobs[k], ids_logprobs=g.ids_logprobs[k])
    if step.inputs:
        _input_logprobs(plan, step, spec_of, out)
    if step.hidden_rows:
        sel = torch.cat([torch.arange(a, a + n) for _, a, n in step.hidden_rows]).to(step.hidden.device)
        parts = step.hidden[sel].float().cpu().split([n for _, _, n in step.hidden_rows])
        for (r, _, _), h in zip(step.hidden_rows, parts):
            out.setdefault(r, RowOut()).hidden = h.numpy().tobytes()
    return out


def _input_logprobs(plan: ForwardPlan, step: StepOutput, spec_of: Callable[[int], SamplingSpec],
                    out: dict[int, RowOut]) -> None:
    """``input_*`` fields of rows with ``logprob_from >= 0``, from ``step.input_lps``."""
    g = step.input_lps or Gathered([], [], [], [])
    for r, first, count in step.inputs:
        spec, ro = spec_of(plan.rows[r].slot), out.setdefault(r, RowOut())
        span = slice(first, first + count)
        ro.input_logprobs = g.chosen[span]
        if spec.top_logprobs_num > 0:
            ro.input_top_ids, ro.input_top_logprobs = g.top_ids[span], g.top_logprobs[span]
        if spec.token_ids_logprob:
            ro.input_ids_logprobs = g.ids_logprobs[span]
