"""The draft model of ``speculative_algorithm="STANDALONE"``: a smaller model with the target's
tokenizer, run in the same worker with its own KV pool.

Its pool has the target's size and is indexed by the same KV locations and req-to-token table,
so the scheduler books pages once for both models. Every row the target runs (prompt chunks,
one-token decodes) the draft model runs first on the same tokens, filling its own KV at the same
locations; a prefix-cache hit therefore finds both models' KV. A verify row with ``draft_steps = k``
is drafted in ``k`` batched steps: the first re-reads the token before the last one (``prev_id``:
after a verify that accepted every draft, the draft model never saw the last draft), the others
feed back the previous draft. The drafts then replace the row's placeholders, and their
distributions ``q`` go to the rejection sampler (``spec_verify``). Draft KV at rejected positions is
overwritten later, as the target's is.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from treadle.gpu_worker.attention.base import create_backend
from treadle.gpu_worker.forward_context import ForwardContext, forward_context
from treadle.gpu_worker.kv_cache import KVCache
from treadle.gpu_worker.layers.attention import Attention
from treadle.gpu_worker.model_loader import build_model, load_weights
from treadle.gpu_worker.sampler import Sampler, _argmax, _row_seed
from treadle.gpu_worker.spec_verify import target_probs
from treadle.gpu_worker.step_inputs import PlanLimits, flatten_plan, indices_to_device
from treadle.runtime.config_snapshot import cached_model_config
from treadle.runtime.messages import ForwardPlan, PlanRow

DRAFT_SEED_SALT = 0x5BD1E995  # a seeded request's draft noise differs from its verify noise


class DraftModel:
    """Weights, KV pool and attention backend of the draft model; ``propose`` fills a plan's drafts."""

    def __init__(self, model_dir: str, target: Any) -> None:
        cfg = target.cfg
        self.config = cached_model_config(model_dir)
        text = getattr(self.config, "text_config", None) or self.config
        if text.vocab_size != target.vocab_size:
            raise ValueError(f"speculative_draft_model_path: the draft model's vocabulary ({text.vocab_size}) differs "
                             f"from the target's ({target.vocab_size}); it must use the same tokenizer")
        self.model = build_model(self.config, target.dtype, target.device, cfg.context_len)
        if self.model.is_encoder or self.model.takes_images:
            raise ValueError("speculative_draft_model_path must be a text decoder (causal LM)")
        load_weights(self.model, model_dir, "auto", self.config, cfg.random_seed,
                     getattr(text, "initializer_range", 0.02))
        self.attn = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.kv_cache: Optional[KVCache] = None
        self.backend = create_backend(cfg.attention_backend, device=target.device, dtype=target.dtype)

    def kv_layers_like(self, target_width: int) -> int:
        """Its KV per token in target layers (to size the target's pool with room for this one)."""
        width = self.attn[0].num_kv_heads * self.attn[0].head_dim
        return -(-len(self.attn) * width // target_width)

    def init_kv(self, kv_tokens: int, kv_dtype: torch.dtype, device: torch.device) -> None:
        a = self.attn[0]
        self.kv_cache = KVCache(len(self.attn), kv_tokens + 1, a.num_kv_heads, a.head_dim, kv_dtype, device)

    @torch.inference_mode()
    def propose(self, plan: ForwardPlan, target: Any) -> dict[int, torch.Tensor]:
        """Run the plan's other rows through the draft model (its KV), then draft every row with
        ``draft_steps``: its input ids become the last token and the drafts. Returns the draft
        distributions ``[k, V]`` of sampled rows by plan row index (greedy rows: none)."""
        drafting = [(r, row) for r, row in enumerate(plan.rows) if row.draft_steps]
        mirror = [PlanRow(row.slot, row.input_ids, row.start_pos, row.new_locs, sample=False)
                  for row in plan.rows if not row.draft_steps and not row.mm]
        q: dict[int, list[torch.Tensor]] = {r: [] for r, _ in drafting}
        drafts: dict[int, list[int]] = {r: [] for r, _ in drafting}
        if drafting:
            at = torch.tensor([[row.slot, row.start_pos - 1] for _, row in drafting], device=target.device)
            prev_locs = target.req_to_token[at[:, 0], at[:, 1]].tolist()
        rows = mirror + [PlanRow(row.slot, [row.prev_id, row.input_ids[0]], row.start_pos - 1,
                                 [prev_locs[i], row.new_locs[0]]) for i, (_, row) in enumerate(drafting)]
        step, active = 1, drafting
        while rows:
            logits = self._forward(ForwardPlan(step=plan.step, prefix_writes=plan.prefix_writes if step == 1 else [],
                                               rows=rows), target)
            for j, (r, row) in enumerate(active):
                tok, dist = self._sample(logits[j:j + 1], target.sampler, row.slot, step)
                drafts[r].append(tok)
                if dist is not None:
                    q[r].append(dist)
            step += 1
            active = [(r, row) for r, row in active if row.draft_steps >= step]
            rows = [PlanRow(row.slot, [drafts[r][-1]], row.start_pos + step - 1, [row.new_locs[step - 1]])
                    for r, row in active]
        for r, row in drafting:
            row.input_ids = [row.input_ids[0], *drafts[r]]
        return {r: torch.cat(v) for r, v in q.items() if v}

    @staticmethod
    def _sample(logits: torch.Tensor, sampler: Sampler, slot: int, step: int) -> tuple[int, Optional[torch.Tensor]]:
        """One draft token for ``slot`` (argmax, or drawn from its filtered distribution, returned too)."""
        spec = sampler.spec(slot)
        if Sampler.is_greedy(spec):
            return int(_argmax(logits)[0]), None
        dist = target_probs(logits, spec)
        gen = sampler.gen
        if spec.seed is not None:
            gen = torch.Generator(device=logits.device).manual_seed(
                _row_seed(spec.seed ^ DRAFT_SEED_SALT, sampler.state.num_out[slot] * 64 + step))
        return int(torch.multinomial(dist[0], 1, generator=gen)), dist

    def _forward(self, plan: ForwardPlan, target: Any) -> Optional[torch.Tensor]:
        """One draft-model forward over ``plan`` (table writes included): logits of its sampling rows."""
        cfg = target.cfg
        s = flatten_plan(plan, PlanLimits(cfg.max_slots, cfg.context_len, cfg.kv_tokens, target.vocab_size),
                         target.sampler.spec, extras=False, report=False, takes_images=False, model_name="draft",
                         lora=False)
        if not s.token_ids:
            return None
        dev = indices_to_device(s, target.device)
        target.req_to_token[dev.write_slots, dev.write_positions] = dev.write_locs
        ctx = ForwardContext(input_ids=dev.input_ids, positions=dev.positions, out_cache_loc=dev.locs,
                             slots=s.row_slots, starts=s.row_starts, extend_lens=s.row_lens,
                             logits_indices=dev.logits_indices, req_to_token=target.req_to_token,
                             kv_cache=self.kv_cache, attn_backend=self.backend)
        ctx.attn_meta = self.backend.init_forward(ctx)
        with forward_context(ctx):
            hidden = self.model(dev.input_ids)
            return self.model.compute_logits(hidden[dev.logits_indices]) if s.logits_indices else None
