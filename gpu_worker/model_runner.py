"""The model-execution half of the GPU worker: owns the model, KV cache and req-to-token table.

``forward(plan)`` runs one scheduler step: it records sampling specs of new slots, writes the
plan's KV locations into req-to-token, runs all rows as one batch (linear layers see the
concatenated tokens; only attention is per row), projects the last token of each sampling row
(positions asked for input logprobs go through the LM head apart, in bounded chunks) to logits and samples. Rows
whose slot asked get ``RowOut`` extras (logprobs, hidden states); nobody asking costs nothing.
No sockets here; ``worker_proc`` wraps this in a process.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from transformers import AutoConfig

from treadle.gpu_worker.attention.base import create_backend
from treadle.gpu_worker.awq import awq_config, dequantized as awq_dequantized, keeps as awq_keeps
from treadle.gpu_worker.cuda_graph import DecodeGraphs
from treadle.gpu_worker.distributed import broadcast_int, first_failed_rank, init_parallel
from treadle.gpu_worker.forward_context import ForwardContext, forward_context
from treadle.gpu_worker.host_to_device import to_device, to_device_segments
from treadle.gpu_worker.kv_cache import KVCache
from treadle.gpu_worker.layers.attention import Attention
from treadle.gpu_worker.layers.linear import use_triton_gemv
from treadle.gpu_worker.layers.pdl import pdl_supported
from treadle.gpu_worker.loader import init_dummy_weights, iter_safetensors
from treadle.gpu_worker.logits_processing import PendingIds
from treadle.gpu_worker.logprobs import StepOutput, input_logprobs, row_outs
from treadle.gpu_worker.lora import LoRAAdapter, LoRAPool, read_adapter
from treadle.gpu_worker.mm_inputs import MmInputs
from treadle.gpu_worker.models.registry import get_model_class
from treadle.gpu_worker.pipeline import Stage
from treadle.gpu_worker.pooling import load_pooling_config, pool
from treadle.gpu_worker.sampler import Sampler
from treadle.runtime.messages import PLACEHOLDER, ForwardPlan, RowOut, SamplingSpec
from treadle.runtime.server_args import LORA_NOT_ENABLED

logger = logging.getLogger("treadle.worker")
_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16, "fp16": torch.float16}
_KV_DTYPES = {**_DTYPES, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


@dataclass
class Launched:
    """A step whose device work is queued; ``ModelRunner.finish`` turns it into host results."""

    result: Optional[tuple[list[int], dict[int, RowOut]]] = None  # already final
    pending: Optional[PendingIds] = None
    ids_host: Optional[torch.Tensor] = None  # sampled ids (pinned host copy on CUDA)
    event: Optional[Any] = None  # torch.cuda.Event recorded after the copy


@dataclass
class RunnerConfig:
    model_dir: str  # HF-format directory: config.json + *.safetensors
    load_format: str = "auto"  # "auto"/"safetensors": read weights; "dummy": seeded random weights
    dtype: str = "auto"  # "auto" = float32 on CPU, bfloat16 on CUDA
    device: str = "cpu"  # "cpu", "cuda", "cuda:N"
    kv_tokens: int = 4096  # KV-cache capacity in tokens
    max_slots: int = 64  # rows of the req-to-token table (max running requests)
    context_len: int = 2048  # columns of the req-to-token table (max positions per request)
    attention_backend: str = "torch_native"
    random_seed: int = 0
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    cuda_graph_max_bs: int = 0  # > 0: capture decode CUDA graphs up to this batch size (CUDA only)
    mem_fraction_static: float = 0.85  # with kv_tokens <= 0: size the KV pool from free device memory
    custom_all_reduce: bool = False  # TP ranks on one machine: small all-reduces over symmetric memory
    allreduce_fusion: bool = False  # and the reduce before each RMSNorm inside the norm's kernel
    gemv_backend: Optional[str] = None  # one-token products: "triton", "cublas"; None: triton where PDL exists
    kv_cache_dtype: str = "auto"  # "auto" (the model's), "fp8_e4m3", "fp8_e5m2", "bfloat16", ...
    lora_slots: int = 0  # > 0: LoRA adapters, this many on the device at once (max_loras_per_batch)
    lora_rank: int = 0  # the device slots' rank (max_lora_rank)
    lora_targets: Optional[tuple[str, ...]] = None  # the projections with device slots (None: all)


def resolve_kv_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's element type: ``auto`` is the model's."""
    if name == "auto":
        return model_dtype
    if name not in _KV_DTYPES:
        raise ValueError(f"unknown kv_cache_dtype {name!r}; use auto or one of {sorted(_KV_DTYPES)}")
    return _KV_DTYPES[name]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use auto or one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@contextmanager
def _building(dtype: torch.dtype, device: torch.device) -> Iterator[None]:
    """Create parameters directly in the target dtype on the target device (no fp32 detour)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(old)


class ModelRunner:
    def __init__(self, cfg: RunnerConfig):
        self.cfg = cfg
        self.startup_phases: dict[str, float] = {}  # seconds per start-up phase, for the log and benchmarks
        mark = time.perf_counter()

        def phase(name: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            self.startup_phases[name] = round(now - mark, 3)
            mark = now

        self.device = torch.device(cfg.device)
        if self.device.type == "cuda":
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.kv_dtype = resolve_kv_dtype(cfg.kv_cache_dtype, self.dtype)
        init_parallel(cfg.tp_rank, cfg.tp_size, self.device, cfg.pp_rank, cfg.pp_size, self.dtype, cfg.custom_all_reduce,
                      cfg.allreduce_fusion)
        cfg.random_seed = broadcast_int(cfg.random_seed, self.device)
        # Results (samples, extras, control replies) come from one rank: TP rank 0 of the last stage.
        self.reports = cfg.tp_rank == 0 and cfg.pp_rank == cfg.pp_size - 1
        self.model_config = AutoConfig.from_pretrained(cfg.model_dir)
        # The language model's config: the model's own, or the text part of a multimodal one (LLaVA).
        self.text_config = getattr(self.model_config, "text_config", None) or self.model_config
        phase("device_and_parallel_init")
        with _building(self.dtype, self.device):
            self.model = get_model_class(self.model_config)(self.model_config, max_positions=cfg.context_len)
        self.pp: Optional[Stage] = None  # pipeline parallelism: this rank's stage (CUDA graphs off)
        if cfg.pp_size > 1:
            if not getattr(self.model, "supports_pp", False):
                raise ValueError(f"{type(self.model).__name__} does not support pipeline parallelism (pp_size > 1)")
            self.pp, cfg.cuda_graph_max_bs = Stage(self.text_config.hidden_size, self.dtype, self.device), 0
        phase("build")
        if cfg.load_format == "dummy":
            init_dummy_weights(self.model, cfg.random_seed, getattr(self.text_config, "initializer_range", 0.02))
        elif cfg.load_format in ("auto", "safetensors"):
            keep, awq = getattr(self.model, "wants_tensor", None), awq_config(self.model_config)
            weights = iter_safetensors(cfg.model_dir, keep=keep if awq is None else awq_keeps(keep),
                                       lazy=getattr(self.model, "lazy_weights", False))
            self.model.load_weights(weights if awq is None else awq_dequantized(weights, awq["group_size"]))
        else:
            raise ValueError(f"unknown load_format {cfg.load_format!r}")
        self.model.eval().requires_grad_(False)
        pdl = pdl_supported(self.device)
        if self.device.type == "cuda" and (cfg.gemv_backend == "triton" or cfg.gemv_backend is None and pdl):
            use_triton_gemv(self.model, pdl)
        # Multimodal models: vision embeddings of prompts being prefilled (first pipeline stage only).
        self.mm: Optional[MmInputs] = None
        if hasattr(self.model, "encode_images") and cfg.pp_rank == 0:
            self.mm = MmInputs(self.model.encode_images, self.device)
        self.lora: Optional[LoRAPool] = None  # device slots; adapters wait in host memory (lora_adapters)
        self.lora_adapters: dict[str, LoRAAdapter] = {}
        if cfg.lora_slots > 0:
            self.lora = LoRAPool(self.model, cfg.lora_slots, cfg.lora_rank, self.device, self.dtype, cfg.lora_targets)
        phase("weights")

        self.graphs: Optional[DecodeGraphs] = None
        self.graph_capture_time = 0.0
        self.is_encoder = getattr(self.model, "is_encoder", False)
        self.pooling = load_pooling_config(cfg.model_dir, self.is_encoder)
        if self.is_encoder:  # bidirectional: whole sequences each step, no KV cache to keep
            self.kv_cache, self.sampler = None, Sampler(cfg.max_slots, self.device, cfg.random_seed)
            cfg.kv_tokens = cfg.kv_tokens if cfg.kv_tokens > 0 else cfg.max_slots * cfg.context_len
            return
        attn = [m for m in self.model.modules() if isinstance(m, Attention)]
        if cfg.kv_tokens <= 0:
            cfg.kv_tokens = self._kv_tokens_from_memory(len(attn), attn[0].num_kv_heads * attn[0].head_dim)
        # One spare KV location and one spare slot row: padded rows of a CUDA-graph batch write there.
        self.kv_cache = KVCache(len(attn), cfg.kv_tokens + 1, attn[0].num_kv_heads, attn[0].head_dim,
                                self.kv_dtype, self.device)
        self.req_to_token = torch.zeros(cfg.max_slots + 1, cfg.context_len, dtype=torch.int64, device=self.device)
        self.last_token = torch.zeros(cfg.max_slots + 1, dtype=torch.int64, device=self.device)
        self.attn_backend = create_backend(cfg.attention_backend, device=self.device, dtype=self.dtype)
        self.sampler = Sampler(cfg.max_slots, self.device, cfg.random_seed)
        pin = self.device.type == "cuda"
        self._host_ids = [torch.empty(cfg.max_slots, dtype=torch.int64, pin_memory=pin) for _ in range(4)]
        self._ring = 0
        phase("kv_cache_and_buffers")
        if cfg.cuda_graph_max_bs > 0 and self.device.type == "cuda":
            if not hasattr(self.attn_backend, "init_cuda_graph_state"):
                logger.warning("attention backend %s cannot run in CUDA graphs; decoding runs eagerly", cfg.attention_backend)
            else:
                t0 = time.perf_counter()
                self.graphs = DecodeGraphs(self, min(cfg.cuda_graph_max_bs, cfg.max_slots))
                self.graph_capture_time = time.perf_counter() - t0
                phase("cuda_graphs")

    def _kv_tokens_from_memory(self, num_layers: int, kv_width: int) -> int:
        """KV pool size after the weights are loaded: what ``mem_fraction_static`` of the card
        leaves free, identical on every rank (the smallest one wins)."""
        if self.device.type != "cuda":
            raise ValueError("kv_tokens must be given on the CPU (there is no device memory to size from)")
        free, total = torch.cuda.mem_get_info(self.device)
        per_token = 2 * num_layers * kv_width * torch.empty((), dtype=self.kv_dtype).element_size()
        tokens = int((free - total * (1.0 - self.cfg.mem_fraction_static)) // per_token)
        if tokens < self.cfg.context_len:
            raise ValueError(f"only {max(tokens, 0)} KV-cache tokens fit in mem_fraction_static="
                             f"{self.cfg.mem_fraction_static}; the context needs {self.cfg.context_len}")
        if self.cfg.tp_size * self.cfg.pp_size > 1:  # every rank of every stage
            t = torch.tensor([tokens], device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
            tokens = int(t.item())
        return tokens

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    def info(self) -> dict[str, Any]:
        params = list(self.model.parameters())
        return {
            "architecture": type(self.model).__name__,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "num_params": sum(p.numel() for p in params),  # this rank's shard
            "weight_bytes": sum(p.numel() * p.element_size() for p in params),
            "kv_bytes": self.kv_cache.nbytes if self.kv_cache is not None else 0,
            "kv_cache_dtype": str(self.kv_dtype).removeprefix("torch."),
            "is_encoder": self.is_encoder,
            "pooling": {"mode": self.pooling.mode, "normalize": self.pooling.normalize},
            "kv_tokens": self.cfg.kv_tokens,
            "max_slots": self.cfg.max_slots,
            "context_len": self.cfg.context_len,
            "vocab_size": self.vocab_size,
            "attention_backend": self.cfg.attention_backend,
            "tp_rank": self.cfg.tp_rank,
            "tp_size": self.cfg.tp_size,
            "pp_rank": self.cfg.pp_rank,
            "pp_size": self.cfg.pp_size,
            "kv_layers": self.kv_cache.buf.shape[1] if self.kv_cache is not None else 0,  # this stage's layers
            "cuda_graph_bs": self.graphs.sizes if self.graphs is not None else [],
            "cuda_graph_capture_time": self.graph_capture_time,
            "startup_phases": self.startup_phases,
        }

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
            return Launched(result=([], self._encode(plan)))
        step = self._run(plan, extras=True)
        if step is None:
            return Launched(result=([], {}))
        samples, slots = step.logits, step.sample_slots
        want = [j for j, s in enumerate(slots) if self.sampler.spec(s).logprobs] if step.report else []
        # Logprobs are of the raw logits; indexing copies them before the sampler edits ``samples`` in place.
        raw = samples[to_device(want, torch.int64, self.device)] if want else None
        sampling_rows = [r for r in plan.rows if r.sample]
        masks = [(j, r.token_bitmask) for j, r in enumerate(sampling_rows) if r.token_bitmask]  # grammar rows
        if not slots:
            return Launched(result=([], row_outs(plan, step, self.sampler.spec, want, raw, None) if step.report else {}))
        ids_t, pending = self.sampler.sample_deferred(samples, slots, masks)
        self.last_token[step.sample_slots_t] = ids_t  # the next step's placeholder inputs
        failures = self.sampler.state.take_failures()
        if step.report and (want or step.inputs or step.hidden_rows or failures):
            ids = ids_t.tolist()
            self.sampler.state.commit(pending, ids)
            outs = row_outs(plan, step, self.sampler.spec, want, raw, ids_t)
            for j, slot in enumerate(slots):
                if slot in failures:
                    outs.setdefault(step.sample_rows[j], RowOut()).error = failures[slot]
            return Launched(result=(ids, outs))
        if self.device.type != "cuda":
            return Launched(pending=pending, ids_host=ids_t)
        self._ring = (self._ring + 1) % len(self._host_ids)
        host = self._host_ids[self._ring][: len(slots)]
        host.copy_(ids_t, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return Launched(pending=pending, ids_host=host, event=event)

    def finish(self, launched: Launched) -> tuple[list[int], dict[int, RowOut]]:
        """Wait for a launched step's sampled ids (only that step: later queued work keeps running)."""
        if launched.result is not None:
            return launched.result
        if launched.event is not None:
            launched.event.synchronize()
        ids = launched.ids_host.tolist()
        self.sampler.state.commit(launched.pending, ids)
        return ids, {}

    @torch.inference_mode()
    def forward_logits(self, plan: ForwardPlan) -> torch.Tensor:
        """Run one step; raw float32 logits ``[num_sample_rows, vocab]`` instead of samples."""
        step = self._run(plan, extras=False)
        return torch.empty(0, self.vocab_size, device=self.device) if step is None else step.logits

    def load_lora(self, name: str, path: str) -> dict[str, Any]:
        """Read a PEFT adapter into host memory, checked against this model (rank, module shapes);
        a plan's ``lora_loads`` puts it into a device slot when a request needs it."""
        error, adapter = "", None
        try:
            if self.lora is None:
                raise ValueError(LORA_NOT_ENABLED)
            adapter = read_adapter(path)
            self.lora.check(adapter)
        except ValueError as e:
            error = str(e)
        # Every rank must hold the adapter, or none: a rank that failed (another machine's copy of
        # the path, say) fails the load everywhere, so the ranks never disagree about it later.
        failed = first_failed_rank(bool(error), self.device)
        if failed is not None:
            if not error:
                error = f"loading LoRA adapter {name!r} failed on worker rank {failed} (its log says why)"
            raise ValueError(error)
        self.lora_adapters[name] = adapter
        return {"rank": adapter.rank}

    def unload_lora(self, name: str) -> bool:
        return self.lora_adapters.pop(name, None) is not None

    def _encode(self, plan: ForwardPlan) -> dict[int, RowOut]:
        """Encoder models: every row is a whole sequence; return its pooled embedding (float32 bytes)."""
        for ns in plan.new_slots:
            self._check_slot(ns.slot)
        for row in plan.rows:
            if (row.start_pos != 0 or not row.input_ids or max(row.input_ids) >= self.vocab_size
                    or min(row.input_ids) < 0 or row.mm):
                raise ValueError(f"encoder row of slot {row.slot} must be a whole in-vocabulary sequence")
        if not plan.rows or self.cfg.tp_rank != 0:
            return {}
        hidden = self.model.encode([row.input_ids for row in plan.rows])
        return {r: RowOut(hidden=pool(h, self.pooling).cpu().numpy().tobytes()) for r, h in enumerate(hidden)}

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.cfg.max_slots:
            raise ValueError(f"slot {slot} out of range [0, {self.cfg.max_slots})")

    def _check_spec(self, slot: int, sp: SamplingSpec) -> None:
        """Token ids in a spec index the vocabulary on the device: reject bad ones here, not in a kernel."""
        for what, ids in (("logit_bias", sp.logit_bias or {}), ("stop_ids", sp.stop_ids),
                          ("token_ids_logprob", sp.token_ids_logprob or [])):
            if any(not 0 <= t < self.vocab_size for t in ids):
                raise ValueError(f"slot {slot}: {what} has a token id outside [0, {self.vocab_size})")
        if sp.top_logprobs_num < 0:
            raise ValueError(f"slot {slot}: negative top_logprobs_num")

    def _run(self, plan: ForwardPlan, extras: bool) -> Optional[StepOutput]:
        """Table writes + model forward + LM head on the positions that need logits.

        Those are the last position of each sampling row (one matmul) and, if ``extras``, positions
        ``logprob_from .. n-2`` of rows asking for input logprobs (``logprobs.input_logprobs``: apart,
        a bounded number at a time, gathered at once). ``None`` when the plan runs no token or no
        position needs logits and none wants hidden states.
        """
        cfg = self.cfg
        for ns in plan.new_slots:
            self._check_slot(ns.slot)
            self._check_spec(ns.slot, ns.sampling)
            self.sampler.set_slot(ns.slot, ns.sampling, ns.prior_output)
            if self.mm is not None:  # a new request in the slot: the old one's images are gone
                self.mm.drop_slot(ns.slot)
        for load in plan.lora_loads:
            if self.lora is None or load.name not in self.lora_adapters:
                raise ValueError(f"LoRA adapter {load.name!r} is not loaded on this worker")
            self.lora.load(load.slot, self.lora_adapters[load.name])
        lora_tokens: list[int] = []  # the adapter slot of every token, in row order
        # Table writes (prefix hits first, then the rows' new tokens) as (slot, position, loc) triples.
        w_slot, w_pos, w_loc = [], [], []
        for pw in plan.prefix_writes:
            self._check_slot(pw.slot)
            if len(pw.locs) > cfg.context_len:
                raise ValueError(f"prefix of {len(pw.locs)} tokens exceeds context_len {cfg.context_len}")
            w_slot += [pw.slot] * len(pw.locs)
            w_pos += range(len(pw.locs))
            w_loc += pw.locs
        n_prefix = len(w_loc)
        report = extras and self.reports  # only the reporting rank sends results; the others skip the host work
        ids, slots, starts, lens, head_idx, in_idx = [], [], [], [], [], []
        sample_rows, sample_slots, inputs, hidden_rows, ph_idx, ph_slot = [], [], [], [], [], []
        mm_rows = []  # (index of the row's first token in the step, row) of rows with images
        for r, row in enumerate(plan.rows):
            n, off = len(row.input_ids), len(ids)
            self._check_slot(row.slot)
            if n == 0 or len(row.new_locs) != n:
                raise ValueError(f"row of slot {row.slot}: {n} input ids but {len(row.new_locs)} new locs")
            if row.start_pos < 0 or row.start_pos + n > cfg.context_len:
                raise ValueError(f"row of slot {row.slot} spans positions beyond context_len {cfg.context_len}")
            if row.mm:
                if not hasattr(self.model, "encode_images"):
                    raise ValueError(f"row of slot {row.slot} carries images, but {type(self.model).__name__} "
                                     "takes text only")
                mm_rows.append((off, row))
            if n == 1 and row.input_ids[0] == PLACEHOLDER:  # the token this slot sampled last step
                ph_idx.append(off), ph_slot.append(row.slot)
            if extras and row.logprob_from >= 0:  # every rank: the LM head all-gathers
                count = max(n - 1 - row.logprob_from, 0)
                inputs.append((r, len(in_idx), count))
                in_idx += range(off + row.logprob_from, off + n - 1)
            if row.sample:
                head_idx.append(off + n - 1)
                sample_rows.append(r), sample_slots.append(row.slot)
            spec = self.sampler.spec(row.slot)
            if report and spec.embed:  # an embedding request: the last position's hidden state
                hidden_rows.append((r, off + n - 1, 1))
            elif report and spec.return_hidden:
                hidden_rows.append((r, off, n))
            ids += row.input_ids
            if self.lora is not None:
                lora_tokens += [row.lora_slot] * n
            slots.append(row.slot), starts.append(row.start_pos), lens.append(n)
            w_slot += [row.slot] * n
            w_pos += range(row.start_pos, row.start_pos + n)
            w_loc += row.new_locs
        if not w_loc:
            return None
        if min(w_loc) < 0 or max(w_loc) >= cfg.kv_tokens:
            raise ValueError(f"KV location out of range [0, {cfg.kv_tokens})")
        if ids and (max(ids) >= self.vocab_size or (min(ids) < 0 and min(ids) != PLACEHOLDER)
                    or ids.count(PLACEHOLDER) != len(ph_idx)):
            raise ValueError(f"token id out of range [0, {self.vocab_size}) (or a placeholder in a multi-token row)")
        mm_embeds = self.mm.step_embeds(mm_rows) if mm_rows and self.mm is not None else None

        # One host->device copy for all index data; the rows' positions and KV locations once more
        # on their own, aligned, for the Triton kernels that take them (see to_device_segments).
        t, p, s, q = len(ids), n_prefix, len(sample_slots), len(ph_idx)
        (input_ids, w_slot_t, w_pos_t, w_loc_t, positions_t, locs_t, head_t, sample_slots_t, ph_idx_t,
         ph_slot_t) = to_device_segments([ids, w_slot, w_pos, w_loc, w_pos[p:], w_loc[p:], head_idx, sample_slots,
                                          ph_idx, ph_slot], torch.int64, self.device)
        self.req_to_token[w_slot_t, w_pos_t] = w_loc_t
        if not ids:
            return None
        if q:
            input_ids[ph_idx_t] = self.last_token[ph_slot_t]

        lora_t = None if self.lora is None else torch.tensor(lora_tokens, dtype=torch.int64)
        if self.graphs is not None and t == len(plan.rows) == s and not in_idx and not mm_rows and self.graphs.fits(t):
            lora_dev = None if lora_t is None else lora_t.to(self.device, non_blocking=True)
            hidden, logits = self.graphs.replay(input_ids, positions_t, locs_t, w_slot_t[p:], lora_dev)
            return StepOutput(hidden, logits, sample_rows, sample_slots, inputs, hidden_rows, report, sample_slots_t)
        if lora_t is not None:
            self.lora.set_token_slots(lora_t)
        ctx = ForwardContext(
            input_ids=input_ids, positions=positions_t, out_cache_loc=locs_t,
            slots=slots, starts=starts, extend_lens=lens, logits_indices=head_t,
            req_to_token=self.req_to_token, kv_cache=self.kv_cache, attn_backend=self.attn_backend,
            mm_embeds=mm_embeds)
        ctx.attn_meta = self.attn_backend.init_forward(ctx)
        with forward_context(ctx):
            hidden = self.model(input_ids) if self.pp is None else self.pp.forward(self.model, input_ids)
            if hidden is None:  # a pipeline stage before the last: handed on, nothing to project
                return None
            if not head_idx and not hidden_rows and not inputs:
                return None
            logits = self.model.compute_logits(hidden[ctx.logits_indices]) if head_idx else None
            input_lps = None
            if in_idx:  # prompt positions asking for input logprobs: projected apart, in chunks
                input_lps = input_logprobs(plan, inputs, hidden[to_device(in_idx, torch.int64, self.device)],
                                           self.model.compute_logits, self.sampler.spec, report)
        return StepOutput(hidden, logits, sample_rows, sample_slots, inputs, hidden_rows, report, sample_slots_t,
                          input_lps)

