"""Verifying speculative drafts against the target model (the worker's side of speculative decoding).

A verify row ran the request's last token and its ``k`` drafts ``d_1..d_k`` in one forward, so the
target's logits at its ``k + 1`` positions are the distributions ``p_0..p_k`` of the tokens after
each prefix. Greedy rows accept drafts while ``argmax p_i == d_{i+1}`` and add the argmax at the
first mismatch (or after the last draft): exactly the tokens one-at-a-time decoding would give.
Sampled rows use rejection sampling (Leviathan et al., Chen et al.): draft ``d`` drawn from ``q`` is
accepted with probability ``min(1, p(d) / q(d))``; at the first rejection the token is drawn from
``norm(max(p - q, 0))`` and the row stops; when every draft passes, a last token comes from ``p_k``.
Each produced token is then distributed as ``p`` (temperature, top-k/p, min-p applied) whatever
``q`` is. N-gram drafts have no distribution: ``q`` is a point mass on the draft, so acceptance is
``p(d)`` and the fallback is ``p`` without ``d``. Tree rows (several continuations at once) are accepted by ``spec_tree``.
"""

from __future__ import annotations

from typing import Optional

import torch

from treadle.gpu_worker.host_to_device import to_device
from treadle.gpu_worker.kv_cache import KVCache
from treadle.gpu_worker.logprobs import StepOutput, gather_logprobs
from treadle.gpu_worker.layers import batch_invariant
from treadle.gpu_worker.sampler import DETERMINISTIC_SEED, Sampler, _argmax, _row_seed
from treadle.gpu_worker.spec_tree import accept_tree_greedy, accept_tree_sampled, move_path_kv
from treadle.runtime.messages import ForwardPlan, RowOut, SamplingSpec


def target_probs(logits: torch.Tensor, spec: SamplingSpec) -> torch.Tensor:
    """``[n, V]`` float32 logits -> the distributions the sampler draws from, normalized: temperature,
    then top-k, top-p, min-p with ``Sampler._filter``'s rules (top-p and min-p on the sorted
    probabilities). A small top-k takes ``topk`` instead of sorting the vocabulary."""
    probs = torch.softmax(logits.float() / spec.temperature, dim=-1)
    vocab = probs.shape[-1]
    k = vocab if spec.top_k < 1 else min(spec.top_k, vocab)
    if k < vocab:
        vals, idx = probs.topk(k, dim=-1)
    elif spec.top_p < 1.0 or spec.min_p > 0.0:
        vals, idx = probs.sort(dim=-1, descending=True, stable=True)
    else:
        return probs
    drop = (vals.cumsum(dim=-1) - vals) > spec.top_p
    drop |= vals < vals[:, :1] * spec.min_p
    out = torch.zeros_like(probs).scatter_(1, idx, vals.masked_fill(drop, 0.0))
    return out / out.sum(dim=-1, keepdim=True)


def accept_chain(p: torch.Tensor, drafts: list[int], q: Optional[torch.Tensor],
                 gen: Optional[torch.Generator]) -> list[int]:
    """Rejection sampling of one chain: ``p [k+1, V]`` target distributions, ``drafts`` (``k``),
    ``q [k, V]`` the draft distributions (None: point masses on the drafts). The produced tokens."""
    k, dev = len(drafts), p.device
    idx = torch.arange(k, device=dev)
    d = to_device(drafts, torch.int64, dev)
    ratio = p[idx, d] if q is None else p[idx, d] / q[idx, d].clamp_min(1e-20)
    u = torch.rand(k, generator=gen, device=dev)
    ok = (u < ratio).tolist()
    a = ok.index(False) if False in ok else k
    if a < k:  # the first rejected draft: draw from what p has beyond q
        resid = p[a].clone()
        if q is None:
            resid[drafts[a]] = 0.0
        else:
            resid = (resid - q[a]).clamp_min_(0.0)
        last = resid if float(resid.sum()) > 0 else p[a]
    else:
        last = p[k]
    tok = int(torch.multinomial(last, 1, generator=gen))
    return drafts[:a] + [tok]


def accept_greedy(targets: list[int], drafts: list[int]) -> list[int]:
    """Drafts while they equal the target's argmax, then the target's own token."""
    a = 0
    while a < len(drafts) and targets[a] == drafts[a]:
        a += 1
    return drafts[:a] + [targets[a]]


class Verified:
    """A step's verify rows, split off the sampling rows' logits (``take``), then accepted (``run``)."""

    def __init__(self, logits: torch.Tensor, rows: list[tuple[int, int, int]]):
        self.logits, self.rows = logits, rows
        self.tokens: dict[int, list[int]] = {}  # plan row -> produced tokens
        self.outs: dict[int, list[RowOut]] = {}  # plan row -> their logprob extras (slots that asked)
        self.paths: dict[int, list[int]] = {}  # plan row -> the accepted nodes (root first; a chain: 0..a)

    @staticmethod
    def take(step: StepOutput) -> Optional["Verified"]:
        """The verify rows' logits, cut off ``step.logits`` (which keeps the sampling rows')."""
        if not step.spec_rows:
            return None
        n = len(step.sample_slots)
        v = Verified(step.logits[n:], step.spec_rows)
        step.logits = step.logits[:n]
        return v

    def run(self, plan: ForwardPlan, sampler: Sampler, draft_q: dict[int, torch.Tensor],
            last_token: torch.Tensor, kv_cache: Optional[KVCache] = None) -> None:
        """Accept every verify row's drafts; record the tokens in the sampler's slot state and as the
        slots' last tokens. ``draft_q``: a draft model's distributions by plan row (STANDALONE).
        Tree rows (``row.tree``): the accepted path's KV moves to the row's first locations."""
        greedy = [Sampler.is_greedy(sampler.spec(plan.rows[r].slot)) for r, _, _ in self.rows]
        targets = _argmax(self.logits).tolist() if any(greedy) else []
        for (r, first, count), g in zip(self.rows, greedy):
            row = plan.rows[r]
            nodes = row.input_ids[len(row.input_ids) - row.spec - 1:]
            drafts = nodes[1:]
            spec = sampler.spec(row.slot)
            gen = sampler.gen  # the shared generator: its draws depend on the batch, so the mode seeds every row
            seed = DETERMINISTIC_SEED if batch_invariant.ENABLED and spec.seed is None else spec.seed
            if not g and seed is not None:
                gen = torch.Generator(device=self.logits.device).manual_seed(
                    _row_seed(seed, sampler.state.num_out[row.slot]))
            if row.tree:
                if g:
                    toks, path = accept_tree_greedy(targets[first:first + count], nodes, row.tree)
                else:
                    toks, path = accept_tree_sampled(target_probs(self.logits[first:first + count], spec), nodes,
                                                     row.tree, gen)
                move_path_kv(kv_cache.buf, row.new_locs[len(row.new_locs) - count:], path)
            elif g:
                toks = accept_greedy(targets[first:first + count], drafts)
                path = list(range(len(toks)))
            else:
                p = target_probs(self.logits[first:first + count], spec)
                toks = accept_chain(p, drafts, draft_q.get(r), gen)
                path = list(range(len(toks)))
            self.tokens[r], self.paths[r] = toks, path
            sampler.state.append(row.slot, toks)
            last_token[row.slot] = toks[-1]
            if spec.logprobs:
                m = len(toks)
                at = to_device([first + n for n in path], torch.int64, self.logits.device)
                gl = gather_logprobs(self.logits[at], to_device(toks, torch.int64, self.logits.device),
                                     [spec.top_logprobs_num] * m, [list(spec.token_ids_logprob or [])] * m)
                self.outs[r] = [RowOut(logprob=gl.chosen[j], top_ids=gl.top_ids[j], top_logprobs=gl.top_logprobs[j],
                                       ids_logprobs=gl.ids_logprobs[j]) for j in range(m)]

    def merge(self, plan: ForwardPlan, ids: list[int], outs: dict[int, RowOut]) -> tuple[list[int], dict[int, RowOut]]:
        """One id per sampling row in plan order (a verify row's: its first token) and each verify
        row's ``RowOut`` with all its tokens (``spec_ids``) and their logprobs."""
        merged, it = [], iter(ids)
        for r, row in enumerate(plan.rows):
            if not row.sample:
                continue
            if r in self.tokens:
                merged.append(self.tokens[r][0])
                outs[r] = RowOut(spec_ids=self.tokens[r], spec_outs=self.outs.get(r, []))
            else:
                merged.append(next(it))
        return merged, outs
