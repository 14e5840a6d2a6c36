"""EAGLE / EAGLE3 drafting in the worker: the head's KV kept in step with the target, and drafts
proposed as a chain (``speculative_eagle_topk`` 1) or a tree.

Pairs. The head at draft position ``p`` reads the target's hidden state at ``p`` and the token at
``p + 1``, and predicts the token at ``p + 2`` (SGLang's layout). After every target forward
(``observe``) the head runs over the pairs the step made known: a row's positions with the next
token (the following input, the sampled token, or for a verify row the accepted path and its
last token); a prompt chunk's last hidden state waits for the next chunk's first token
(``pending``). Its KV is written at the target's locations (its own pool, the same table), so the
head's cache is the sequence's, and the last pair's output is where the next drafts start.

Drafts (``propose``, before the verify forward). Node 0 is the last token; its children come from
the last pair's logits. A node at depth ``d`` is expanded by one head step on (its parent's
output, its token) at position ``pos + d - 1``, attending to the cached prefix and its expanded
ancestors (a tree row; their KV sits in a scratch area past the pool). Each expanded node offers
its ``topk`` likeliest tokens, scored by the summed log-probabilities of the path; the ``topk``
best new nodes are expanded next (SGLang's EAGLE tree). After ``draft_steps`` levels the
``spec`` best nodes form the tree (a parent outscores its children, so the set is closed under
ancestors); with ``topk`` 1 it is a chain. Drafts are chosen without randomness, so the target
accepts them as point masses (``spec_tree``), greedy and sampled alike.

Tensor parallelism: the head is sharded like the target, not replicated. It is built from the
target's TP-aware layers (``models/llama_eagle.py``), so its attention heads and MLP columns split
over the ranks with their own all-reduce, its KV pool holds each rank's KV heads as the target's
does, and the checkpoint loads through the same shard loaders: no second, unsharded code path to
keep exact, and no full copy of the head per rank. What it reads is full on every rank: EAGLE the
final hidden states (after the final norm's all-reduce), EAGLE3 the taps taken where the norms
return the reduced residual stream (``tap_residual_stream``), the embedding all-reduced, the LM
heads gathered before ``d2t``. The ranks therefore compute the same drafts; each level's top-k
(values and ids) is still broadcast from TP rank 0, so every rank grows, and verifies, one tree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Union

import torch

from treadle.gpu_worker.attention.base import create_backend
from treadle.gpu_worker.distributed import first_failed_rank, tp_broadcast, tp_size
from treadle.gpu_worker.forward_context import ForwardContext, forward_context
from treadle.gpu_worker.kv_cache import KVCache
from treadle.gpu_worker.models.llama_eagle import EagleHead, eagle3_capture_layers, read_head, tap_residual_stream
from treadle.runtime.messages import ForwardPlan

from treadle.gpu_worker.spec_draft import DraftModel

if TYPE_CHECKING:
    from treadle.gpu_worker.model_runner import ModelRunner


class EagleDraft:
    """The head, its KV pool, the target hidden states it reads and the per-slot drafting state."""

    def __init__(self, model_dir: str, target: Any, eagle3: bool, topk: int, steps: int) -> None:
        from transformers import AutoConfig

        cfg, tcfg = target.cfg, target.text_config
        backbone = getattr(target.model, "model", None)
        if getattr(backbone, "layers", None) is None or getattr(backbone, "embed_tokens", None) is None:
            raise ValueError(f"speculative_algorithm={'EAGLE3' if eagle3 else 'EAGLE'!r} needs a Llama-family target "
                             f"(decoder layers and an embedding to read), not {type(target.model).__name__}")
        raw, tensors = read_head(model_dir)
        arch = (raw.get("architectures") or [""])[0]
        if "Eagle" in arch and ("Eagle3" in arch) != eagle3:
            raise ValueError(f"speculative_draft_model_path holds an {'EAGLE3' if 'Eagle3' in arch else 'EAGLE'} head "
                             f"({arch}), but speculative_algorithm={'EAGLE3' if eagle3 else 'EAGLE'!r}")
        self.config = AutoConfig.for_model(**{**raw, "model_type": "llama"})
        if self.config.vocab_size != target.vocab_size:
            raise ValueError(f"speculative_draft_model_path: the EAGLE head's vocabulary ({self.config.vocab_size}) "
                             f"differs from the target's ({target.vocab_size})")
        reads = getattr(self.config, "target_hidden_size", None) or self.config.hidden_size
        if reads != tcfg.hidden_size:
            raise ValueError(f"speculative_draft_model_path: the EAGLE head reads hidden states of size {reads}, the "
                             f"target's are {tcfg.hidden_size}")
        self.head = EagleHead(self.config, eagle3, set(tensors), cfg.context_len).to(target.dtype)
        self.head.load_weights(tensors.items())
        self.head.to(target.device).eval()
        self.eagle3, self.topk, self.steps, self.target = eagle3, topk, steps, target
        self.embed = self._embedding(target.model.model.embed_tokens)
        self.attn = self.head.layer.self_attn.attn
        self.backend = create_backend("torch_native")  # tree rows (drafting) need its masks
        self.kv_cache: Optional[KVCache] = None
        self.pending: dict[int, torch.Tensor] = {}  # slot -> a prompt chunk's last hidden, waiting for its next token
        self.last: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> the last pair's (logits input, hidden)
        self.aux: list[torch.Tensor] = []
        if eagle3:  # the target's low/mid/high hidden states, taken as its layers run
            layers = eagle3_capture_layers(self.config, len(target.model.model.layers))
            tap_residual_stream(target.model.model, layers, lambda h: self.aux.append(h))  # (observe swaps the list)
            target.cfg.cuda_graph_max_bs = 0  # the hooks must run: eager target steps (EAGLE reads the graphs' hidden)

    def _embedding(self, target_embed: torch.nn.Module) -> torch.nn.Module:
        """The embedding the head reads: its own (``EagleHead``), unless that is a copy of the
        target's (most EAGLE checkpoints carry the frozen embedding they were trained with), which
        is then dropped for the target's: no second vocabulary table on the device. Both are split
        the same way, so each rank compares its own shard; the ranks agree through an all-reduce
        (one rank keeping its copy while another drops it would still compute the same, but the
        ranks' modules should not differ)."""
        own = self.head.embed_tokens
        if own is None:
            return target_embed
        tw = getattr(target_embed, "weight", None)
        same = (isinstance(tw, torch.Tensor) and tw.shape == own.weight.shape and tw.dtype == own.weight.dtype
                and torch.equal(tw, own.weight))
        if first_failed_rank(not same, own.weight.device) is not None:
            return own
        self.head.embed_tokens = None
        return target_embed

    def kv_layers_like(self, target_width: int) -> int:
        return -(-self.attn.num_kv_heads * self.attn.head_dim // target_width)

    def init_kv(self, kv_tokens: int, kv_dtype: torch.dtype, device: torch.device) -> None:
        self.scratch = kv_tokens + 1  # past the pool: the KV of expanded draft nodes, topk * steps per drafting row
        self.kv_cache = KVCache(1, self.scratch + self.target.cfg.max_slots * self.topk * self.steps,
                                self.attn.num_kv_heads, self.attn.head_dim, kv_dtype, device)

    def _run(self, ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, locs: torch.Tensor,
             rows: list[tuple[int, int, int]], tree: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One head step over ``rows`` ``(slot, start, n)``: (logits input, next hidden) per token."""
        t = self.target
        ctx = ForwardContext(input_ids=ids, positions=positions, out_cache_loc=locs, slots=[r[0] for r in rows],
                             starts=[r[1] for r in rows], extend_lens=[r[2] for r in rows],
                             logits_indices=ids[:0], req_to_token=t.req_to_token, kv_cache=self.kv_cache,
                             attn_backend=self.backend, tree=tree)
        ctx.attn_meta = self.backend.init_forward(ctx)
        with forward_context(ctx):
            return self.head(self.embed(ids), hidden)

    def logprobs(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Log-probabilities over the head's vocabulary, and the map to target ids (EAGLE3)."""
        head = self.head.lm_head
        if head is None:  # the target's LM head over the whole vocabulary
            return torch.log_softmax(self.target.model.compute_logits(x), dim=-1), None
        return torch.log_softmax(head(x).float(), dim=-1), self.head.d2t + torch.arange(self.head.draft_vocab,
                                                                                         device=x.device)

    @torch.inference_mode()
    def observe(self, plan: ForwardPlan, hidden: Optional[torch.Tensor], verified: Any, last_token: torch.Tensor
                ) -> None:
        """The head over the pairs this step made known (module docstring), its KV written."""
        aux, self.aux = self.aux, []
        if self.eagle3 and aux:
            hidden = torch.cat(aux[-3:], dim=-1)
        if hidden is None:
            return
        for ns in plan.new_slots:
            self.pending.pop(ns.slot, None), self.last.pop(ns.slot, None)
        sampled = [row.slot for r, row in enumerate(plan.rows)
                   if row.sample and not (verified is not None and r in verified.tokens)]
        nxt = dict(zip(sampled, last_token[sampled].tolist())) if sampled else {}
        ids, hs, pos, locs, rows, ends = [], [], [], [], [], []
        r2t, off = self.target.req_to_token, 0
        for r, row in enumerate(plan.rows):
            n, slot, first = len(row.input_ids), row.slot, row.start_pos
            pairs: list[tuple[torch.Tensor, list[int]]] = []  # (hidden states, their next tokens), from ``first``
            locs_r = []
            if slot in self.pending:  # the previous chunk's last position, now that its next token is known
                first -= 1
                pairs.append((self.pending.pop(slot)[None], [row.input_ids[0]]))
                locs_r.append(int(r2t[slot, first]))
            verify = verified is not None and r in verified.tokens
            if verify:  # the accepted path (its KV now at the row's first locations) and the produced tokens
                path, toks = verified.paths[r], verified.tokens[r]
                pairs.append((hidden[[off + j for j in path]], toks))
            else:
                follow = list(row.input_ids[1:]) + ([nxt[slot]] if slot in nxt else [])
                pairs.append((hidden[off:off + len(follow)], follow))
                if slot not in nxt:
                    self.pending[slot] = hidden[off + n - 1].clone()  # not a view holding the whole step
            off += n
            m = sum(len(t) for _, t in pairs)
            if m == 0:
                continue
            locs_r += row.new_locs[:m - len(locs_r)]
            for h, t in pairs:
                hs.append(h)
                ids += t
            locs += locs_r
            pos += range(first, first + m)
            rows.append((slot, first, m))
            ends.append((slot, len(ids) - 1, verify or slot in nxt))
        if not rows:
            return
        dev = hidden.device
        out, feat = self._run(torch.tensor(ids, device=dev), torch.cat(hs), torch.tensor(pos, device=dev),
                              torch.tensor(locs, device=dev), rows)
        for slot, i, produced in ends:
            if produced:
                self.last[slot] = (out[i], feat[i])

    @torch.inference_mode()
    def propose(self, plan: ForwardPlan, target: Any) -> dict[int, torch.Tensor]:
        """Fill every drafting row's nodes (and ``tree``, unless a chain), all rows' trees grown
        level by level together: one LM head call and one head forward per level. No
        distributions are returned: the drafts are point masses."""
        drafting = [row for row in plan.rows if row.draft_steps]
        trees = [_Tree(row, self.last.get(row.slot), self.scratch + j * self.topk * self.steps)
                 for j, row in enumerate(drafting)]
        active, depth = [t for t in trees if t.x is not None], 1
        while active:
            lp, vocab_ids = self.logprobs(torch.cat([t.x for t in active]))
            top_v, top_i = lp.topk(self.topk, dim=-1)
            if tp_size() > 1:  # one tree on every rank: TP rank 0's choices (values and ids exact in float64)
                both = tp_broadcast(torch.cat([top_v.double(), top_i.double()]))
                top_v, top_i = both[:len(top_v)], both[len(top_v):].long()
            if vocab_ids is not None:  # EAGLE3: draft ids -> target ids
                top_i = vocab_ids[top_i]
            top_v, top_i, a = top_v.tolist(), top_i.tolist(), 0
            for t in active:
                n = len(t.frontier)
                t.add_children(top_v[a:a + n], top_i[a:a + n], depth)
                a += n
            active = [t for t in active if depth < t.row.draft_steps]
            if not active:
                break
            ids, hs, pos, locs, rows, masks = [], [], [], [], [], {}
            for r, t in enumerate(active):
                own, mask = t.expand(self.topk)
                n = len(t.frontier)
                ids += [t.nodes[c][0] for c in t.frontier]
                hs += [t.nodes[t.nodes[c][1]][4] for c in t.frontier]
                pos += [t.row.start_pos + depth - 1] * n
                locs += own[-n:]
                rows.append((t.row.slot, t.row.start_pos, n))
                masks[r] = (own, mask)
            dev = hs[0].device
            tree = {r: (torch.tensor(own, device=dev), m.to(dev)) for r, (own, m) in masks.items()}
            x, feat = self._run(torch.tensor(ids, device=dev), torch.stack(hs), torch.tensor(pos, device=dev),
                                torch.tensor(locs, device=dev), rows, tree)
            a = 0
            for t in active:
                n = len(t.frontier)
                t.x = x[a:a + n]
                for i, c in enumerate(t.frontier):
                    t.nodes[c][4] = feat[a + i]
                a += n
            depth += 1
        for t in trees:
            tokens, parents = t.best()
            row, k = t.row, len(tokens)
            row.input_ids = [row.input_ids[0], *tokens]
            row.new_locs, row.spec = row.new_locs[:k + 1], k
            row.tree = [] if parents == list(range(k)) else parents
        return {}


class _Tree:
    """One row's draft tree while it grows. Nodes are ``[token, parent, score, depth, hidden]``
    (node 0 the last token; ``hidden``: the head's output once the node is expanded); a score is
    the summed log-probability of the node's path."""

    def __init__(self, row: Any, last: Optional[tuple[torch.Tensor, torch.Tensor]], base: int) -> None:
        self.row, self.base = row, base
        self.x = None if last is None else last[0][None]  # LM head inputs of the frontier
        self.nodes: list[list[Any]] = [[row.input_ids[0], 0, 0.0, 0, None if last is None else last[1]]]
        self.frontier, self.cands = [0], []
        self.slot_of: dict[int, int] = {}  # expanded node -> its index in ``scratch``

    def add_children(self, values: list[list[float]], tokens: list[list[int]], depth: int) -> None:
        """Each frontier node's top-k tokens become its children (candidates for the next level)."""
        self.cands = []
        for parent, vs, ts in zip(self.frontier, values, tokens):
            for v, tok in zip(vs, ts):
                self.nodes.append([tok, parent, self.nodes[parent][2] + v, depth, None])
                self.cands.append(len(self.nodes) - 1)

    def expand(self, topk: int) -> tuple[list[int], torch.Tensor]:
        """The ``topk`` best candidates become the frontier, each with a scratch KV location; returns
        the scratch locations of every expanded node and the frontier's ancestor mask over them."""
        self.frontier = sorted(self.cands, key=lambda c: (-self.nodes[c][2], c))[:topk]
        for c in self.frontier:
            self.slot_of[c] = len(self.slot_of)
        mask = torch.zeros(len(self.frontier), len(self.slot_of), dtype=torch.bool)
        for a, c in enumerate(self.frontier):
            while c != 0:
                mask[a, self.slot_of[c]] = True
                c = self.nodes[c][1]
        return [self.base + i for i in range(len(self.slot_of))], mask

    def best(self) -> tuple[list[int], list[int]]:
        """The ``row.spec`` best nodes (parents outscore children: closed under ancestors), in
        creation order: their tokens and parents. No state (nothing observed yet): one guess."""
        if self.x is None and len(self.nodes) == 1:
            return [self.row.input_ids[0]], [0]
        best = sorted(range(1, len(self.nodes)), key=lambda c: (-self.nodes[c][2], c))[:self.row.spec]
        best.sort()
        index = {0: 0, **{c: i + 1 for i, c in enumerate(best)}}
        return [self.nodes[c][0] for c in best], [index[self.nodes[c][1]] for c in best]


def build_draft(runner: "ModelRunner") -> Optional[Union[DraftModel, EagleDraft]]:
    """The runner's draft: an EAGLE / EAGLE3 head or a STANDALONE draft model, or None without
    ``speculative_draft_model_path`` (NGRAM drafts on the scheduler)."""
    cfg = runner.cfg
    if cfg.draft_model_dir is None:
        return None
    if cfg.pp_size > 1:
        raise ValueError(f"speculative_algorithm={cfg.spec_algorithm or 'STANDALONE'!r} does not run with "
                         "pp_size > 1 yet")
    if cfg.spec_algorithm in ("EAGLE", "EAGLE3"):
        return EagleDraft(cfg.draft_model_dir, runner, cfg.spec_algorithm == "EAGLE3", cfg.spec_topk, cfg.spec_steps)
    return DraftModel(cfg.draft_model_dir, runner)
