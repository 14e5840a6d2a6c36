"""One ``ForwardPlan`` flattened into the host-side index lists of one batched forward, checked.

All rows of a step run as one batch: linear layers see the concatenated tokens (row order), only
attention is per row. ``flatten_plan`` turns the plan's rows and prefix writes into the lists the
runner copies to the device at once (token ids, req-to-token writes, the positions that go
through the LM head, ...), and rejects a plan that would index outside the worker's tables or
the vocabulary: a bad index must fail here with a message, not in a kernel. Pure Python, so the
layout can be tested without a device; ``indices_to_device`` then copies the lists over at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Union

import torch

from treadle.gpu_worker.host_to_device import to_device_segments
from treadle.runtime.messages import PLACEHOLDER, ForwardPlan, PlanRow, SamplingSpec


@dataclass(frozen=True)
class PlanLimits:
    """The worker's table sizes a plan's indices must stay within."""

    max_slots: int  # rows of the req-to-token table
    context_len: int  # its columns: positions per request
    kv_tokens: int  # KV-cache locations
    vocab_size: int


@dataclass
class StepInputs:
    """The flattened step. "Index" means a token's index in the step's batch (row order)."""

    token_ids: list[int] = field(default_factory=list)  # PLACEHOLDER where the slot's last sample goes
    row_slots: list[int] = field(default_factory=list)  # per row: slot, first position, token count
    row_starts: list[int] = field(default_factory=list)
    row_lens: list[int] = field(default_factory=list)
    # req-to-token writes as (slot, position, KV location) triples: prefix hits first, then the rows' tokens
    write_slots: list[int] = field(default_factory=list)
    write_positions: list[int] = field(default_factory=list)
    write_locs: list[int] = field(default_factory=list)
    num_prefix_writes: int = 0
    logits_indices: list[int] = field(default_factory=list)  # last token of each sampling row
    sample_rows: list[int] = field(default_factory=list)  # plan row index of each sampling row
    sample_slots: list[int] = field(default_factory=list)
    # input logprobs: (plan row, first entry, count) per row asking, and the indices projected for them
    input_logprob_rows: list[tuple[int, int, int]] = field(default_factory=list)
    input_logprob_indices: list[int] = field(default_factory=list)
    hidden_rows: list[tuple[int, int, int]] = field(default_factory=list)  # (plan row, first index, count)
    placeholder_indices: list[int] = field(default_factory=list)  # tokens that take their slot's last sample
    placeholder_slots: list[int] = field(default_factory=list)
    mm_rows: list[tuple[int, PlanRow]] = field(default_factory=list)  # (index of the row's first token, row) with images
    lora_slots: list[int] = field(default_factory=list)  # the adapter slot of every token (LoRA on only)
    # verify rows (speculative decoding): (plan row, first logits row after the sampling rows', count),
    # their positions projected after the sampling rows' (``logits_indices`` ends with ``spec_indices``)
    spec_rows: list[tuple[int, int, int]] = field(default_factory=list)
    spec_indices: list[int] = field(default_factory=list)
    tree_rows: list[tuple[int, int, list[int], int]] = field(default_factory=list)  # (row, first index, parents, start)


def check_slot(slot: int, max_slots: int) -> None:
    if not 0 <= slot < max_slots:
        raise ValueError(f"slot {slot} out of range [0, {max_slots})")


def check_spec(slot: int, sp: SamplingSpec, vocab_size: int) -> None:
    """Token ids in a spec index the vocabulary on the device: reject bad ones here, not in a kernel."""
    for what, ids in (("logit_bias", sp.logit_bias or {}), ("stop_ids", sp.stop_ids),
                      ("token_ids_logprob", sp.token_ids_logprob or [])):
        if any(not 0 <= t < vocab_size for t in ids):
            raise ValueError(f"slot {slot}: {what} has a token id outside [0, {vocab_size})")
    if sp.top_logprobs_num < 0:
        raise ValueError(f"slot {slot}: negative top_logprobs_num")


def flatten_plan(plan: ForwardPlan, limits: PlanLimits, spec_of: Callable[[int], SamplingSpec], *,
                 extras: bool, report: bool, takes_images: bool, model_name: str, lora: bool) -> StepInputs:
    """The plan's prefix writes and rows as ``StepInputs`` (``plan.new_slots`` are the caller's:
    ``spec_of`` already knows their specs).

    ``extras``: build the input-logprob indices (every TP rank: the LM head all-gathers);
    ``report``: also the hidden-state rows (only the rank that sends results needs them);
    ``takes_images``: whether rows may carry images (``model_name`` says who refuses them);
    ``lora``: record each token's adapter slot.
    """
    s = StepInputs()
    for pw in plan.prefix_writes:
        check_slot(pw.slot, limits.max_slots)
        if len(pw.locs) > limits.context_len:
            raise ValueError(f"prefix of {len(pw.locs)} tokens exceeds context_len {limits.context_len}")
        s.write_slots += [pw.slot] * len(pw.locs)
        s.write_positions += range(len(pw.locs))
        s.write_locs += pw.locs
    s.num_prefix_writes = len(s.write_locs)
    for r, row in enumerate(plan.rows):
        n, off = len(row.input_ids), len(s.token_ids)
        check_slot(row.slot, limits.max_slots)
        if n == 0 or len(row.new_locs) != n:
            raise ValueError(f"row of slot {row.slot}: {n} input ids but {len(row.new_locs)} new locs")
        if row.start_pos < 0 or row.start_pos + n > limits.context_len:
            raise ValueError(f"row of slot {row.slot} spans positions beyond context_len {limits.context_len}")
        if row.mm:
            if not takes_images:
                raise ValueError(f"row of slot {row.slot} carries images, but {model_name} takes text only")
            s.mm_rows.append((off, row))
        if n == 1 and row.input_ids[0] == PLACEHOLDER:  # the token this slot sampled last step
            s.placeholder_indices.append(off), s.placeholder_slots.append(row.slot)
        if extras and row.logprob_from >= 0:  # every rank: the LM head all-gathers
            count = max(n - 1 - row.logprob_from, 0)
            s.input_logprob_rows.append((r, len(s.input_logprob_indices), count))
            s.input_logprob_indices += range(off + row.logprob_from, off + n - 1)
        if row.sample and row.spec:  # a verify row: logits at its last token and every draft
            if not 0 < row.spec < n:
                raise ValueError(f"row of slot {row.slot}: {row.spec} drafts in a row of {n} tokens")
            s.spec_rows.append((r, len(s.spec_indices), row.spec + 1))
            if row.tree:  # drafts as a tree (spec_tree.py): positions by depth, an ancestor mask
                if (n != row.spec + 1 or len(row.tree) != row.spec
                        or any(not 0 <= p <= i for i, p in enumerate(row.tree))):
                    raise ValueError(f"row of slot {row.slot}: tree parents {row.tree} do not fit {row.spec} drafts")
                s.tree_rows.append((r, off + n - 1 - row.spec, row.tree, row.start_pos + n - 1 - row.spec))
            s.spec_indices += range(off + n - 1 - row.spec, off + n)
        elif row.sample:
            s.logits_indices.append(off + n - 1)
            s.sample_rows.append(r), s.sample_slots.append(row.slot)
        spec = spec_of(row.slot)
        if report and spec.embed:  # an embedding request: the last position's hidden state
            s.hidden_rows.append((r, off + n - 1, 1))
        elif report and spec.return_hidden:
            s.hidden_rows.append((r, off, n))
        s.token_ids += row.input_ids
        if lora:
            s.lora_slots += [row.lora_slot] * n
        s.row_slots.append(row.slot), s.row_starts.append(row.start_pos), s.row_lens.append(n)
        s.write_slots += [row.slot] * n
        s.write_positions += range(row.start_pos, row.start_pos + n)
        s.write_locs += row.new_locs
    s.logits_indices += s.spec_indices
    _check_indices(s, limits)
    return s


def _check_indices(s: StepInputs, limits: PlanLimits) -> None:
    """KV locations within the pool; token ids within the vocabulary, placeholders only where counted."""
    if not s.write_locs:
        return
    if min(s.write_locs) < 0 or max(s.write_locs) >= limits.kv_tokens:
        raise ValueError(f"KV location out of range [0, {limits.kv_tokens})")
    ids = s.token_ids
    if ids and (max(ids) >= limits.vocab_size or (min(ids) < 0 and min(ids) != PLACEHOLDER)
                or ids.count(PLACEHOLDER) != len(s.placeholder_indices)):
        raise ValueError(f"token id out of range [0, {limits.vocab_size}) (or a placeholder in a multi-token row)")


class DeviceIndices(NamedTuple):
    """A step's ``StepInputs`` lists on the device (views into one copy)."""

    input_ids: torch.Tensor
    write_slots: torch.Tensor
    write_positions: torch.Tensor
    write_locs: torch.Tensor
    positions: torch.Tensor  # the rows' tokens' positions and KV locations (the writes after the prefix ones)
    locs: torch.Tensor
    logits_indices: torch.Tensor
    sample_slots: torch.Tensor
    placeholder_indices: torch.Tensor
    placeholder_slots: torch.Tensor


def indices_to_device(s: StepInputs, device: Union[torch.device, str]) -> DeviceIndices:
    """One host->device copy for all index data; the rows' positions and KV locations once more
    on their own, aligned, for the Triton kernels that take them (see to_device_segments)."""
    p = s.num_prefix_writes
    return DeviceIndices(*to_device_segments(
        [s.token_ids, s.write_slots, s.write_positions, s.write_locs, s.write_positions[p:], s.write_locs[p:],
         s.logits_indices, s.sample_slots, s.placeholder_indices, s.placeholder_slots], torch.int64, device))
