"""The model-execution half of the GPU worker: owns the model, KV cache and req-to-token table.

``forward(plan)`` runs one scheduler step: it records sampling specs of new slots, writes the
plan's KV locations into req-to-token, runs all rows as one batch (linear layers see the
concatenated tokens; only attention is per row), projects the last token of each sampling row
(positions asked for input logprobs go through the LM head apart, in bounded chunks) to logits and samples. Rows
whose slot asked get ``RowOut`` extras (logprobs, hidden states); nobody asking costs nothing.
No sockets here; ``gpu_worker.main`` wraps this in a process. Building and loading the model is
``model_loader``'s, turning a plan into index lists ``step_inputs``'s, running a step eagerly
(table writes, the model's forward, the LM head) ``eager_step``'s.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional, Union

import torch

from treadle.gpu_worker.attention.base import create_backend
from treadle.gpu_worker.cuda_graph import DecodeGraphs
from treadle.gpu_worker.distributed import broadcast_int, init_parallel
from treadle.gpu_worker.eager_step import forward_eager, prepare_step
from treadle.gpu_worker.host_to_device import to_device
from treadle.gpu_worker.kv_cache import KVCache
from treadle.gpu_worker.kv_sizing import KvSizing, size_kv_pool
from treadle.gpu_worker.launched import HostIdRing, Launched
from treadle.gpu_worker.layers import batch_invariant
from treadle.gpu_worker.layers.attention import Attention
from treadle.gpu_worker.layers.moe_ep import init_expert_parallel
from treadle.gpu_worker.logprobs import StepOutput, row_outs, step_output
from treadle.gpu_worker.lora import LoRAPool
from treadle.gpu_worker.lora_adapter import LoRAAdapter, load_planned, read_on_all_ranks
from treadle.gpu_worker.mm_inputs import MmInputs
from treadle.gpu_worker.model_loader import (
    build_model, claim_device, load_weights, resolve_dtype, resolve_kv_dtype, select_gemv,
)
from treadle.gpu_worker.pdmux import PdMux
from treadle.gpu_worker.pipeline import Stage
from treadle.gpu_worker.pooling import PoolingConfig, encode_plan, load_pooling_config
from treadle.gpu_worker.runner_config import RunnerConfig
from treadle.gpu_worker.sampler import Sampler
from treadle.gpu_worker.runner_info import phase_clock, runner_info
from treadle.gpu_worker.spec_draft import DraftModel
from treadle.gpu_worker.spec_eagle import EagleDraft, build_draft
from treadle.gpu_worker.spec_tree import check_tree_model
from treadle.gpu_worker.spec_verify import Verified
from treadle.gpu_worker.step_inputs import check_slot, check_spec
from treadle.gpu_worker.torchao_quant import apply_torchao
from treadle.runtime.config_snapshot import cached_model_config
from treadle.runtime.messages import ForwardPlan, RowOut
from treadle.runtime.parallel import is_reporting

__all__ = ["Launched", "ModelRunner", "RunnerConfig", "resolve_dtype", "resolve_kv_dtype"]

logger = logging.getLogger("treadle.worker")


class ModelRunner:
    def __init__(self, cfg: RunnerConfig):
        self.cfg = cfg
        self.startup_phases: dict[str, float] = {}  # seconds per start-up phase, for the log and benchmarks
        phase = phase_clock(self.startup_phases)
        self.device = claim_device(cfg.device)
        batch_invariant.enable(cfg.deterministic)  # enable_deterministic_inference: one switch per process
        if cfg.deterministic:  # the fused reduce + norm kernel takes only small batches: one norm code for all
            cfg.custom_all_reduce = cfg.allreduce_fusion = False
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.kv_dtype = resolve_kv_dtype(cfg.kv_cache_dtype, self.dtype)
        init_parallel(cfg.tp_rank, cfg.tp_size, self.device, cfg.pp_rank, cfg.pp_size, self.dtype, cfg.custom_all_reduce,
                      cfg.allreduce_fusion)
        init_expert_parallel(cfg.ep_size)
        cfg.random_seed = broadcast_int(cfg.random_seed, self.device)
        # Results (samples, extras, control replies) come from one rank: TP rank 0 of the last stage.
        self.reports = is_reporting(cfg.tp_rank, cfg.pp_rank, cfg.pp_size)
        self.model_config = cached_model_config(cfg.model_dir)  # AutoConfig's (a snapshot of it); LLaVA-1.5 mapped
        # The language model's config: the model's own, or the text part of a multimodal one (LLaVA).
        self.text_config = getattr(self.model_config, "text_config", None) or self.model_config
        phase("device_and_parallel_init")

        self.model = build_model(self.model_config, self.dtype, self.device, cfg.context_len, cfg.quantization)
        self.pp: Optional[Stage] = None  # pipeline parallelism: this rank's stage (CUDA graphs off)
        if cfg.pp_size > 1:
            if not self.model.supports_pp:
                raise ValueError(f"{type(self.model).__name__} does not support pipeline parallelism (pp_size > 1)")
            self.pp, cfg.cuda_graph_max_bs = Stage(self.text_config.hidden_size, self.dtype, self.device), 0
        phase("build")

        load_weights(self.model, cfg.model_dir, cfg.load_format, self.model_config, cfg.random_seed,
                     getattr(self.text_config, "initializer_range", 0.02))
        if not cfg.deterministic:  # the GEMV's one-token reduction differs from the batch-invariant matmul's
            select_gemv(self.model, self.device, cfg.gemv_backend)
        apply_torchao(self.model, cfg.torchao_config)  # after the GEMV choice: it takes its layers off it
        # Multimodal models: vision embeddings of prompts being prefilled (first pipeline stage only).
        self.mm: Optional[MmInputs] = None
        if self.model.takes_images and cfg.pp_rank == 0:
            self.mm = MmInputs(self.model.encode_images, self.device)
        self.lora: Optional[LoRAPool] = None  # device slots; adapters wait in host memory (lora_adapters)
        self.lora_adapters: dict[str, LoRAAdapter] = {}
        if cfg.lora_slots > 0:
            self.lora = LoRAPool(self.model, cfg.lora_slots, cfg.lora_rank, self.device, self.dtype, cfg.lora_targets)
        if cfg.spec_topk > 1:
            check_tree_model(self.model)
        self.draft: Optional[Union[DraftModel, EagleDraft]] = build_draft(self)  # speculative decoding's draft
        phase("weights")

        self.graphs: Optional[DecodeGraphs] = None
        self.pdmux: Optional[PdMux] = None  # enable_pdmux (set once the graphs are captured)
        self.graph_capture_time = 0.0
        self.kv_sizing: Optional[KvSizing] = None
        self.is_encoder = self.model.is_encoder
        self.pooling = load_pooling_config(cfg.model_dir, self.is_encoder)
        if self.model.scores_head:  # class scores: the [CLS] / last token's, never normalized
            self.pooling = PoolingConfig("cls" if self.is_encoder else "last", False)
        if self.is_encoder:  # bidirectional: whole sequences each step, no KV cache to keep
            self.kv_cache, self.sampler = None, Sampler(cfg.max_slots, self.device, cfg.random_seed)
            cfg.kv_tokens = cfg.kv_tokens if cfg.kv_tokens > 0 else cfg.max_slots * cfg.context_len
            return
        self._init_kv_cache_and_buffers()
        phase("kv_cache_and_buffers")
        if cfg.cuda_graph_max_bs > 0 and self.device.type == "cuda" and not self.model.scores_head:
            self.capture_graphs(phase)  # a score model never decodes: no graphs
        self.pdmux = PdMux(self, cfg.pdmux_decode_sms) if cfg.pdmux else None  # after the graphs it replays

    def _init_kv_cache_and_buffers(self) -> None:
        """The KV pool (sized from free memory when ``kv_tokens <= 0``: by ``mem_fraction_static``, or
        without one from a measured prefill, ``kv_sizing.py``), the req-to-token table, the attention
        backend, the sampler and (CUDA) the pinned buffers sampled ids are copied into."""
        cfg = self.cfg
        attn = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.req_to_token = torch.zeros(cfg.max_slots + 1, cfg.context_len, dtype=torch.int64, device=self.device)
        self.last_token = torch.zeros(cfg.max_slots + 1, dtype=torch.int64, device=self.device)
        name = cfg.attention_backend + ("_deterministic" if cfg.deterministic else "")
        self.attn_backend = create_backend(name, device=self.device, dtype=self.dtype)
        self.sampler = Sampler(cfg.max_slots, self.device, cfg.random_seed)
        self._host_ids = HostIdRing(cfg.max_slots) if self.device.type == "cuda" else None
        self.kv_sizing = size_kv_pool(self, attn)
        # One spare KV location and one spare slot row: padded rows of a CUDA-graph batch write there.
        self.kv_cache = KVCache(len(attn), cfg.kv_tokens + 1, attn[0].num_kv_heads, attn[0].head_dim,
                                self.kv_dtype, self.device)
        if self.draft is not None:
            self.draft.init_kv(cfg.kv_tokens, self.kv_dtype, self.device)

    def capture_graphs(self, phase: Callable[[str], None] = lambda name: None) -> None:
        if not hasattr(self.attn_backend, "init_cuda_graph_state"):
            logger.warning("attention backend %s cannot run in CUDA graphs; decoding runs eagerly",
                           self.cfg.attention_backend)
            return
        t0 = time.perf_counter()
        self.graphs = DecodeGraphs(self, min(self.cfg.cuda_graph_max_bs, self.cfg.max_slots))
        self.graph_capture_time = time.perf_counter() - t0
        phase("cuda_graphs")

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    def info(self) -> dict[str, Any]:
        """What the worker reports at start-up and in ``get_server_info`` (``runner_info``)."""
        return runner_info(self)

    @torch.inference_mode()
    def forward(self, plan: ForwardPlan) -> tuple[list[int], dict[int, RowOut]]:
        """Run one step: one sampled token id per row with ``sample=True`` (row order), and the
        ``RowOut`` extras (logprobs, hidden states) of the rows whose slot asked, by plan row index."""
        return self.finish(self.launch(plan))

    @torch.inference_mode()
    def launch(self, plan: ForwardPlan) -> Launched:
        """Queue one step's device work and return without waiting for it (overlap scheduling:
        the next plan is prepared while this one runs). ``finish`` brings the sampled ids to the
        host. Steps whose rows want extras (logprobs, hidden states, embeddings) are finished here."""
        if self.is_encoder:
            rows = encode_plan(self.model, plan, self.pooling, self.cfg.max_slots, self.vocab_size, self.cfg.tp_rank)
            return Launched(result=([], rows))
        draft_q = self.draft.propose(plan, self) if self.draft is not None else {}  # STANDALONE: fills the drafts
        step = self._run(plan, extras=True)
        if step is None:
            return Launched(result=([], {}))
        verified = Verified.take(step)  # speculative decoding's verify rows: accepted apart, merged at the end
        if verified is not None:
            verified.run(plan, self.sampler, draft_q, self.last_token, self.kv_cache)
        samples, slots = step.logits, step.sample_slots
        want = [j for j, s in enumerate(slots) if self.sampler.spec(s).logprobs] if step.report else []
        # Logprobs are of the raw logits; indexing copies them before the sampler edits ``samples`` in place.
        raw = samples[to_device(want, torch.int64, self.device)] if want else None
        sampling_rows = [r for r in plan.rows if r.sample]
        masks = [(j, r.token_bitmask) for j, r in enumerate(sampling_rows) if r.token_bitmask]  # grammar rows
        if not slots:
            self._observe(plan, step, verified)
            outs = row_outs(plan, step, self.sampler.spec, want, raw, None) if step.report else {}
            return Launched(result=verified.merge(plan, [], outs) if verified is not None else ([], outs))
        ids_t, uncommitted = self.sampler.sample_deferred(samples, slots, masks)
        self.last_token[step.sample_slots_t] = ids_t  # the next step's placeholder inputs
        self._observe(plan, step, verified)
        failures = self.sampler.state.take_failures()
        if step.report and (want or step.inputs or step.hidden_rows or failures or verified is not None):
            ids = ids_t.tolist()
            self.sampler.state.commit(uncommitted, ids)
            outs = row_outs(plan, step, self.sampler.spec, want, raw, ids_t)
            for j, slot in enumerate(slots):
                if slot in failures:
                    outs.setdefault(step.sample_rows[j], RowOut()).error = failures[slot]
            return Launched(result=verified.merge(plan, ids, outs) if verified is not None else (ids, outs))
        if self.device.type != "cuda":
            return Launched(uncommitted=uncommitted, ids_host=ids_t)
        host, event = self._host_ids.copy(ids_t)
        return Launched(uncommitted=uncommitted, ids_host=host, event=event)

    def _observe(self, plan: ForwardPlan, step: StepOutput, verified: Optional[Verified]) -> None:
        """EAGLE: the draft head reads the step's hidden states and the tokens now known."""
        if isinstance(self.draft, EagleDraft):
            self.draft.observe(plan, step.hidden, verified, self.last_token)

    def finish(self, launched: Launched) -> tuple[list[int], dict[int, RowOut]]:
        """Wait for a launched step's sampled ids (only that step: later queued work keeps running)."""
        if launched.result is not None:
            return launched.result
        if launched.event is not None:
            launched.event.synchronize()
        ids = launched.ids_host.tolist()
        self.sampler.state.commit(launched.uncommitted, ids)
        return ids, {}

    @torch.inference_mode()
    def forward_logits(self, plan: ForwardPlan) -> torch.Tensor:
        """Run one step; raw float32 logits ``[num_sample_rows, vocab]`` instead of samples."""
        step = self._run(plan, extras=False)
        return torch.empty(0, self.vocab_size, device=self.device) if step is None else step.logits

    def load_lora(self, name: str, path: str) -> dict[str, Any]:
        """Read a PEFT adapter into host memory on every rank (or fail on all of them), checked
        against this model; a plan's ``lora_loads`` puts it into a device slot when a request needs it."""
        adapter = read_on_all_ranks(name, path, self.lora, self.device)
        self.lora_adapters[name] = adapter
        return {"rank": adapter.rank}

    def unload_lora(self, name: str) -> bool:
        return self.lora_adapters.pop(name, None) is not None

    def _run(self, plan: ForwardPlan, extras: bool) -> Optional[StepOutput]:
        """Table writes + model forward + LM head on the positions that need logits: the last position
        of each sampling row (one matmul) and, if ``extras``, positions ``logprob_from .. n-2`` of rows
        asking for input logprobs (``logprobs.input_logprobs``: apart, a bounded number at a time).
        ``None`` when the plan runs no token or no position needs logits and none wants hidden states."""
        self._take_new_slots(plan)
        load_planned(self.lora, self.lora_adapters, plan.lora_loads)
        report = extras and self.reports  # only the reporting rank sends results; the others skip the host work
        if self.pdmux is not None and (split := self.pdmux.split(plan)) is not None:
            return self.pdmux.run(plan, split, extras, report)  # decode and prefill rows as two nano-batches
        s, dev = prepare_step(self, plan, extras, report) or (None, None)
        if s is None:
            return None
        mm_embeds = self.mm.step_embeds(s.mm_rows) if s.mm_rows and self.mm is not None else None
        lora_t = None if self.lora is None else torch.tensor(s.lora_slots, dtype=torch.int64)
        t = len(s.token_ids)
        if (self.graphs is not None and t == len(plan.rows) == len(s.sample_slots) and not s.input_logprob_indices
                and not s.mm_rows and self.graphs.fits(t)):
            lora_dev = None if lora_t is None else lora_t.to(self.device, non_blocking=True)
            hidden, logits = self.graphs.replay(dev.input_ids, dev.positions, dev.locs,
                                                dev.write_slots[s.num_prefix_writes:], lora_dev)
            return step_output(s, dev, hidden, logits, report)
        if lora_t is not None:
            self.lora.set_token_slots(lora_t)
        return forward_eager(self, plan, s, dev, mm_embeds, report)

    def _take_new_slots(self, plan: ForwardPlan) -> None:
        """The plan's new requests: their (checked) sampling specs into the sampler."""
        for ns in plan.new_slots:
            check_slot(ns.slot, self.cfg.max_slots)
            check_spec(ns.slot, ns.sampling, self.vocab_size)
            self.sampler.set_slot(ns.slot, ns.sampling, ns.prior_output)
            if self.mm is not None:  # a new request in the slot: the old one's images are gone
                self.mm.drop_slot(ns.slot)
