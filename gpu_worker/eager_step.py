"""One step run eagerly: the plan's index lists on the device (req-to-token written, placeholder
inputs filled), then the model's forward in a ``ForwardContext`` and the LM head on the positions
that need logits. ``ModelRunner`` runs a whole plan this way when no CUDA graph takes it, and the
PD-multiplexed path (``pdmux.py``) runs each nano-batch's half of a plan through the same two
functions, so the joint and split paths cannot drift apart. The graph replay and the sampling stay
in ``model_runner.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from treadle.gpu_worker.forward_context import ForwardContext, forward_context
from treadle.gpu_worker.host_to_device import to_device
from treadle.gpu_worker.logprobs import StepOutput, input_logprobs, step_output
from treadle.gpu_worker.spec_eagle import EagleDraft
from treadle.gpu_worker.spec_tree import tree_attention, tree_backend
from treadle.gpu_worker.step_inputs import DeviceIndices, PlanLimits, StepInputs, flatten_plan, indices_to_device
from treadle.runtime.messages import ForwardPlan

if TYPE_CHECKING:
    from treadle.gpu_worker.model_runner import ModelRunner


def prepare_step(r: "ModelRunner", plan: ForwardPlan, extras: bool,
                 report: bool) -> Optional[tuple[StepInputs, DeviceIndices]]:
    """The plan's index lists (checked) on the device, its KV locations written into req-to-token
    and its placeholder inputs filled; ``None`` when it runs no token."""
    cfg = r.cfg
    s = flatten_plan(plan, PlanLimits(cfg.max_slots, cfg.context_len, cfg.kv_tokens, r.vocab_size),
                     r.sampler.spec, extras=extras, report=report, takes_images=r.model.takes_images,
                     model_name=type(r.model).__name__, lora=r.lora is not None)
    if not s.write_locs:
        return None
    dev = indices_to_device(s, r.device)
    r.req_to_token[dev.write_slots, dev.write_positions] = dev.write_locs
    if not s.token_ids:
        return None
    if s.placeholder_indices:
        dev.input_ids[dev.placeholder_indices] = r.last_token[dev.placeholder_slots]
    return s, dev


def forward_eager(r: "ModelRunner", plan: ForwardPlan, s: StepInputs, dev: DeviceIndices,
                  mm_embeds: Optional[tuple[torch.Tensor, torch.Tensor]], report: bool) -> Optional[StepOutput]:
    """The model over the prepared step; ``None`` on a pipeline stage before the last, or when no
    position needs logits and nothing reads the hidden states."""
    ctx = ForwardContext(
        input_ids=dev.input_ids, positions=dev.positions, out_cache_loc=dev.locs,
        slots=s.row_slots, starts=s.row_starts, extend_lens=s.row_lens, logits_indices=dev.logits_indices,
        req_to_token=r.req_to_token, kv_cache=r.kv_cache, attn_backend=r.attn_backend,
        mm_embeds=mm_embeds)
    if s.tree_rows:  # speculative tree rows: positions by depth, ancestor masks (a torch-native step)
        ctx.tree = tree_attention(s.tree_rows, dev.locs, dev.positions)
        ctx.attn_backend = tree_backend(r.attn_backend)
    ctx.attn_meta = ctx.attn_backend.init_forward(ctx)
    with forward_context(ctx):
        hidden = r.model(dev.input_ids) if r.pp is None else r.pp.forward(r.model, dev.input_ids)
        if hidden is None:  # a pipeline stage before the last: handed on, nothing to project
            return None
        if (not s.logits_indices and not s.hidden_rows and not s.input_logprob_rows
                and not isinstance(r.draft, EagleDraft)):  # (an EAGLE head reads every step's hidden states)
            return None
        logits = r.model.compute_logits(hidden[ctx.logits_indices]) if s.logits_indices else None
        input_lps = None
        if s.input_logprob_indices:  # prompt positions asking for input logprobs: projected apart, in chunks
            at = to_device(s.input_logprob_indices, torch.int64, r.device)
            input_lps = input_logprobs(plan, s.input_logprob_rows, hidden[at], r.model.compute_logits,
                                       r.sampler.spec, report)
    return step_output(s, dev, hidden, logits, report, input_lps)
