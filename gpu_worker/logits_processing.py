"""Per-slot sampling state and the logit edits that depend on it (bias, penalties, masks, user code).

The worker remembers, for each request slot, its ``SamplingSpec`` and the tokens it has output so
far (seeded from ``NewSlot.prior_output``, so a re-admitted request keeps its penalties, its
``min_new_tokens`` progress and its seeded sample stream). ``apply`` edits the logits of the rows
whose spec needs it, in SGLang/OpenAI order: logit_bias, repetition penalty, frequency/presence
penalty, min_new_tokens stop masking, custom processors. Rows that need nothing cost nothing, and
a batch where no row needs anything returns before touching the device.

Penalties count output tokens only. Their count table ``[max_slots, vocab]`` lives on the device and
is allocated the first time any row uses a penalty (on a 150k vocabulary and 256 slots it is
~150 MB, which a deployment that never penalizes should not pay); from then on every sampled
token is added to it with one scatter, so no per-step host work scales with vocabulary.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

import torch

from treadle.gpu_worker.host_to_device import to_device
from treadle.runtime.logit_processor import CustomLogitProcessor, load_processor
from treadle.runtime.messages import SamplingSpec


def apply_token_bitmasks(logits: torch.Tensor, masks: Sequence[tuple[int, bytes]]) -> None:
    """Grammar masks: ``logits[row, t] = -inf`` where bit ``t % 32`` of int32 word ``t // 32`` of the
    row's bitmask is 0 (xgrammar's layout). xgrammar's kernels do it (CPU code, Triton on CUDA; about
    8x faster than unpacking bits in torch, which remains the fallback). Tokens past the bitmask (a
    vocabulary padded wider than the grammar's) are disallowed."""
    rows = [r for r, _ in masks]
    size = len(masks[0][1])
    buf = bytearray(b"\xff" * (size * logits.shape[0]))  # all allowed; then the masked rows
    for r, m in masks:
        buf[r * size:(r + 1) * size] = m
    words = size // 4
    bitmask = to_device(torch.frombuffer(buf, dtype=torch.int32).view(-1, words), torch.int32, logits.device)
    covered = min(logits.shape[-1], words * 32)
    idx = to_device(rows, torch.int64, logits.device)
    try:
        import xgrammar

        xgrammar.apply_token_bitmask_inplace(logits, bitmask, vocab_size=covered, indices=rows)
    except ImportError:
        bits = (bitmask[idx][:, :, None] >> torch.arange(32, dtype=torch.int32, device=logits.device)) & 1
        logits[idx, :covered] = logits[idx, :covered].masked_fill(bits.flatten(1)[:, :covered] == 0, float("-inf"))
    if logits.shape[-1] > covered:
        logits[idx, covered:] = float("-inf")


def uses_penalty(spec: SamplingSpec) -> bool:
    return spec.repetition_penalty != 1.0 or spec.frequency_penalty != 0.0 or spec.presence_penalty != 0.0


def needs_processing(spec: SamplingSpec) -> bool:
    """Whether ``apply`` has anything to do for a row with this spec."""
    return (bool(spec.logit_bias) or uses_penalty(spec) or (spec.min_new_tokens > 0 and bool(spec.stop_ids))
            or spec.custom_processor is not None)


class PendingIds:
    """Sampled ids of one step still on the device: their slots (with the slot's generation, so a
    slot reused meanwhile is not credited) until the host learns their values."""

    def __init__(self, slots: list[int], gens: list[int], ids: torch.Tensor):
        self.slots, self.gens, self.ids, self.done = slots, gens, ids, False


class SlotState:
    """Host-side output ids may lag the device by the steps in flight (overlap scheduling): lengths
    (``num_out``) are exact at launch time, the values arrive with ``commit`` (or ``sync``, for the
    rare users of values: custom processors and the first penalty)."""

    def __init__(self, max_slots: int, device: torch.device):
        self.device = device
        self.specs: list[SamplingSpec] = [SamplingSpec() for _ in range(max_slots)]
        self.outputs: list[list[int]] = [[] for _ in range(max_slots)]
        self.num_out = [0] * max_slots  # tokens output so far, pending ones included
        self.gen = [0] * max_slots  # bumped by set_slot: a new request in the slot
        self.pending: list[PendingIds] = []
        self.failures: dict[int, str] = {}  # slot -> error of its custom processor (see take_failures)
        self.active = [False] * max_slots  # needs_processing(specs[slot]), cached
        self.counts: Optional[torch.Tensor] = None  # float32 [max_slots, vocab], lazily
        self._procs: dict[tuple[str, str], CustomLogitProcessor] = {}

    def set_slot(self, slot: int, spec: SamplingSpec, prior_output: Sequence[int] = ()) -> None:
        self.specs[slot] = spec
        self.outputs[slot] = list(prior_output)
        self.num_out[slot] = len(prior_output)
        self.gen[slot] += 1
        self.active[slot] = needs_processing(spec)
        if self.counts is not None:
            self.counts[slot].zero_()
            self._count([slot] * len(prior_output), list(prior_output))

    def record(self, slots: list[int], ids: torch.Tensor) -> PendingIds:
        """One sampled token per row, still on the device: counted now, its value committed later."""
        for s in slots:
            self.num_out[s] += 1
        if self.counts is not None:
            s = to_device(slots, torch.int64, self.device)
            self.counts.index_put_((s, ids), torch.ones_like(ids, dtype=torch.float32), accumulate=True)
        p = PendingIds(slots, [self.gen[s] for s in slots], ids)
        self.pending.append(p)
        return p

    def append(self, slot: int, ids: list[int]) -> None:
        """Tokens a verify row produced (speculative decoding), known on the host already."""
        self.num_out[slot] += len(ids)
        self.outputs[slot] += ids
        if self.counts is not None:
            self._count([slot] * len(ids), ids)

    def commit(self, p: PendingIds, host_ids: list[int]) -> None:
        """The host values of a recorded step (in step order; a no-op if ``sync`` took them already)."""
        if p.done:
            return
        for s, g, t in zip(p.slots, p.gens, host_ids):
            if self.gen[s] == g:
                self.outputs[s].append(t)
        p.done = True
        self.pending.remove(p)

    def sync(self) -> None:
        """Bring every pending value to the host now (waits for the device)."""
        for p in list(self.pending):
            self.commit(p, p.ids.tolist())

    def _count(self, slots: list[int], ids: list[int]) -> None:
        if ids:
            idx = to_device([slots, ids], torch.int64, self.device)
            self.counts.index_put_((idx[0], idx[1]), torch.ones(len(ids), device=self.device), accumulate=True)

    def _ensure_counts(self, vocab: int) -> torch.Tensor:
        if self.counts is None:
            self.sync()
            self.counts = torch.zeros(len(self.specs), vocab, dtype=torch.float32, device=self.device)
            pairs = [(s, t) for s, out in enumerate(self.outputs) for t in out]
            self._count([s for s, _ in pairs], [t for _, t in pairs])
        return self.counts

    def processor(self, path: str, state: Optional[dict[str, Any]]) -> CustomLogitProcessor:
        """One instance per (import path, state): user processors may keep caches on ``self``."""
        key = (path, json.dumps(state, sort_keys=True))
        if key not in self._procs:
            self._procs[key] = load_processor(path, state)
        return self._procs[key]

    def apply(self, logits: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """Edit ``logits [n, V]`` (float32, row i belongs to ``slots[i]``) in place; returns it."""
        rows = [i for i, s in enumerate(slots) if self.active[s]]
        if not rows:
            return logits
        vocab = logits.shape[-1]
        specs = {i: self.specs[slots[i]] for i in rows}
        # 1. logit_bias (additive). Out-of-vocabulary ids are skipped here (ModelRunner rejects them
        # earlier) so a bad id can never become a device-side indexing fault.
        bias = [(i, t, v) for i in rows for t, v in (specs[i].logit_bias or {}).items() if 0 <= t < vocab]
        if bias:
            r, c, v = zip(*bias)
            logits.index_put_(self._idx(r, c), to_device(v, logits.dtype, self.device), accumulate=True)
        # 2-3. repetition (HF: divide positive logits, multiply negative ones) then frequency/presence.
        pen = [i for i in rows if uses_penalty(specs[i])]
        if pen:
            counts = self._ensure_counts(vocab)
            r_t, s_t = self._idx(pen, [slots[i] for i in pen])
            params = to_device([[specs[i].repetition_penalty, specs[i].frequency_penalty, specs[i].presence_penalty]
                                for i in pen], torch.float32, self.device)
            rp, fp, pp = (x[:, None] for x in params.unbind(1))
            c, x = counts[s_t], logits[r_t]
            seen = c > 0
            x = torch.where(seen, torch.where(x > 0, x / rp, x * rp), x)
            logits[r_t] = x - fp * c - pp * seen
        # 4. min_new_tokens: stop ids are impossible until enough tokens were output.
        mask = [(i, t) for i in rows if self.num_out[slots[i]] < specs[i].min_new_tokens
                for t in specs[i].stop_ids if 0 <= t < vocab]
        if mask:
            r, c = zip(*mask)
            logits[self._idx(r, c)] = float("-inf")
        # 5. custom processors, one call per (processor, state) group.
        groups: dict[tuple[str, str], list[int]] = {}
        for i in rows:
            sp = specs[i]
            if sp.custom_processor is not None:
                groups.setdefault((sp.custom_processor, json.dumps(sp.custom_state, sort_keys=True)), []).append(i)
        if groups:
            self.sync()
        for group in groups.values():
            sp = specs[group[0]]
            try:  # user code: a failure fails these requests (see ``failures``), never the worker
                proc = self.processor(sp.custom_processor, sp.custom_state)
                params = [dict(specs[i].custom_params or {}, __output_ids__=list(self.outputs[slots[i]])) for i in group]
                idx = to_device(group, torch.int64, self.device)
                logits[idx] = proc(logits[idx], params).to(device=logits.device, dtype=logits.dtype)
            except Exception as e:
                message = f"The custom logit processor {sp.custom_processor} failed: {type(e).__name__}: {e}"
                self.failures.update((slots[i], message) for i in group)
        return logits

    def take_failures(self) -> dict[int, str]:
        """Slots whose custom processor raised since the last call, with the error message."""
        out, self.failures = self.failures, {}
        return out

    def _idx(self, *cols: Sequence[int]) -> tuple[torch.Tensor, ...]:
        """Host index lists -> device int64 tensors, in one copy."""
        t = to_device(list(cols), torch.int64, self.device)
        return tuple(t.unbind(0))
