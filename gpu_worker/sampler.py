"""Batched next-token sampling with per-row temperature / top-k / top-p / min-p.

One pass for the whole batch: first the slot-dependent logit edits of ``logits_processing``
(bias, penalties, min_new_tokens, custom processors; skipped when no row uses them), then greedy
rows take the argmax and the others are filtered in sorted order (top-k, top-p, min-p, as SGLang
does), scattered back to vocab order and sampled with an exponential race (``argmax p / q``,
``q ~ Exp(1)``), which equals a multinomial draw. The noise of a row with its own ``seed`` comes
from a generator seeded by (seed, tokens that request has output so far, ``prior_output``
included), so its tokens depend neither on the rest of the batch nor on being re-admitted.
"""

from __future__ import annotations

from typing import Sequence

import torch

from treadle.gpu_worker.host_to_device import to_device
from treadle.gpu_worker.layers import batch_invariant
from treadle.gpu_worker.logits_processing import PendingIds, SlotState, apply_token_bitmasks
from treadle.runtime.messages import SamplingSpec

try:  # one-row argmax in two short launches on CUDA; without triton (CPU-only installs) torch's
    from treadle.gpu_worker.layers.triton_argmax import argmax_rows
except ImportError:
    argmax_rows = None

_GREEDY_EPS = 1e-6
# enable_deterministic_inference: a sampled row without its own seed draws as if seeded with this
# (not from the shared generator, whose draws depend on the batch)
DETERMINISTIC_SEED = 42


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)``; on CUDA in two short launches (``triton_argmax``): torch's reduces one
    long row with a single block, ~27 us for 128k logits on an H200."""
    return argmax_rows(x) if x.is_cuda and argmax_rows is not None else x.argmax(dim=-1)


def _row_seed(seed: int, step: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


class Sampler:
    def __init__(self, max_slots: int, device: torch.device, seed: int = 0):
        self.device = device
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.state = SlotState(max_slots, device)

    def set_slot(self, slot: int, spec: SamplingSpec, prior_output: Sequence[int] = ()) -> None:
        self.state.set_slot(slot, spec, prior_output)

    def spec(self, slot: int) -> SamplingSpec:
        return self.state.specs[slot]

    @staticmethod
    def is_greedy(spec: SamplingSpec) -> bool:
        return spec.temperature < _GREEDY_EPS or spec.top_k == 1

    def sample(self, logits: torch.Tensor, slots: list[int],
               masks: Sequence[tuple[int, bytes]] = ()) -> torch.Tensor:
        """``sample_deferred`` with the host values committed at once (one device sync)."""
        ids, pending = self.sample_deferred(logits, slots, masks)
        self.state.commit(pending, ids.tolist())
        return ids

    def sample_deferred(self, logits: torch.Tensor, slots: list[int],
                        masks: Sequence[tuple[int, bytes]] = ()) -> tuple[torch.Tensor, PendingIds]:
        """``logits [n, V]`` float32, one row per slot in ``slots`` -> token ids ``[n]`` int64.

        ``masks``: ``(row, grammar token bitmask)`` pairs, applied last so nothing re-allows a
        token the grammar forbids. ``logits`` may be edited in place. Each sampled token is
        appended to its slot's outputs.
        """
        logits = self.state.apply(logits, slots)
        if masks:
            apply_token_bitmasks(logits, masks)
        ids = self._sample(logits, slots)
        return ids, self.state.record(slots, ids)

    def _sample(self, logits: torch.Tensor, slots: list[int]) -> torch.Tensor:
        specs = [self.state.specs[s] for s in slots]
        greedy = [self.is_greedy(sp) for sp in specs]
        argmax = _argmax(logits)
        if all(greedy):
            return argmax
        vocab = logits.shape[-1]
        params = to_device(
            [[1.0 if g else sp.temperature, sp.top_p, sp.min_p, vocab if sp.top_k < 1 else min(sp.top_k, vocab)]
             for sp, g in zip(specs, greedy)], torch.float32, self.device)
        temp, top_p, min_p, top_k = params.unbind(1)
        det = batch_invariant.ENABLED
        scaled = logits / temp[:, None]
        probs = batch_invariant.softmax(scaled) if det else torch.softmax(scaled, dim=-1)
        if any(not g and (sp.top_k >= 1 or sp.top_p < 1.0 or sp.min_p > 0.0) for sp, g in zip(specs, greedy)):
            probs = self._filter(probs, top_k, top_p, min_p)
        noise = torch.empty_like(probs).exponential_(generator=self.gen)
        for i, (s, sp) in enumerate(zip(slots, specs)):
            seed = DETERMINISTIC_SEED if det and sp.seed is None else sp.seed
            if seed is not None and not greedy[i]:
                g = torch.Generator(device=self.device).manual_seed(_row_seed(seed, self.state.num_out[s]))
                noise[i].exponential_(generator=g)
        sampled = _argmax(probs / noise.clamp_min_(1e-20))  # q == 0 would give 0/0 = NaN
        return torch.where(to_device(greedy, torch.bool, self.device), argmax, sampled)

    @staticmethod
    def _filter(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                min_p: torch.Tensor) -> torch.Tensor:
        sorted_p, idx = probs.sort(dim=-1, descending=True, stable=True)
        ranks = torch.arange(probs.shape[-1], device=probs.device)[None, :]
        drop = ranks >= top_k[:, None]
        drop |= (sorted_p.cumsum(dim=-1) - sorted_p) > top_p[:, None]
        drop |= sorted_p < (sorted_p[:, :1] * min_p[:, None])
        return torch.zeros_like(probs).scatter_(1, idx, sorted_p.masked_fill(drop, 0.0))
