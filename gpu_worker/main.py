"""The GPU-worker process: owns the model and KV tensors, runs one plan per message."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import msgspec
import zmq

from treadle.gpu_worker.memory_occupation import MemoryOccupation
from treadle.gpu_worker.profiler import Profiler
from treadle.gpu_worker.model_loader import reload_weights
from treadle.gpu_worker.proxy_heartbeat import beats_while_busy
from treadle.gpu_worker.warmup import prefill_step_tokens, should_warm_up, warm_up, warmup_lengths
from treadle.gpu_worker.weight_group import WeightGroups
from treadle.gpu_worker.weight_transfer import update_from_shared_memory
from treadle.gpu_worker.weights_by_name import weights_by_name
from treadle.runtime.hf_config import context_length, load_config
from treadle.runtime.messages import (
    WORKER_IN, Call, ChildReady, DestroyWeightsUpdateGroup, DropLoraAdapter, ForwardPlan, GetWeightsByName,
    GetWorkerInfo, InitWeightsUpdateGroup, ReadLoraAdapter, ReleaseMemoryOccupation, Reply, ResumeMemoryOccupation,
    Shutdown, StartProfile, StepResult, StopProfile, UpdateWeightsFromDisk, UpdateWeightsFromDistributed,
    UpdateWeightsFromTensor, WorkerInfo,
)
from treadle.runtime.parallel import exit_when_disconnected, is_reporting
from treadle.runtime.procs import ChildSpec
from treadle.runtime.spec_args import draft_model_dir
from treadle.runtime.zmq_utils import Receiver, Sender

logger = logging.getLogger("treadle.worker")


class WorkerLoop:
    def __init__(self, spec: ChildSpec, ctx: zmq.Context, inbox: Sender) -> None:
        from treadle.gpu_worker.model_runner import ModelRunner, RunnerConfig

        self.spec = spec
        args = spec.args
        self.rank, self.pp_rank = spec.extra.get("tp_rank", 0), spec.extra.get("pp_rank", 0)
        global_rank = self.pp_rank * args.tp_size + self.rank
        endpoint = spec.extra["endpoint"]  # tcp:// (ranks on several machines): the scheduler binds it
        self.recv = Receiver(ctx, endpoint, WORKER_IN, bind=not endpoint.startswith("tcp://"))
        if endpoint.startswith("tcp://"):
            exit_when_disconnected(self.recv.sock, "the scheduler on node 0")
        reports = is_reporting(self.rank, self.pp_rank, args.pp_size)  # TP rank 0 of the last stage
        self.to_scheduler = Sender(ctx, spec.endpoints["scheduler_results"]) if reports else None
        cfg = load_config(spec.files.model_dir)
        self.context_len = context_length(cfg, args, spec.files.model_dir)
        t0 = time.perf_counter()
        device = args.device
        if device == "cuda":
            device = f"cuda:{args.base_gpu_id + spec.extra.get('local_rank', global_rank) * args.gpu_id_step}"
        self.max_slots = args.max_running_requests  # ServerArgs.resolved() decided the defaults
        self.runner = ModelRunner(RunnerConfig(
            model_dir=spec.files.model_dir, load_format=args.load_format, quantization=args.quantization,
            dtype=args.dtype, device=device,
            kv_tokens=args.max_total_tokens or 0, max_slots=self.max_slots, context_len=self.context_len,
            attention_backend=args.attention_backend, random_seed=args.random_seed,
            tp_rank=self.rank, tp_size=args.tp_size, mem_fraction_static=args.mem_fraction_static,
            pp_rank=self.pp_rank, pp_size=args.pp_size, ep_size=args.ep_size,
            custom_all_reduce=not args.disable_custom_all_reduce and args.nnodes == 1,
            allreduce_fusion=args.enable_allreduce_fusion, kv_cache_dtype=args.kv_cache_dtype,
            gemv_backend=args.gemv_backend,
            lora_slots=args.max_loras_per_batch if args.enable_lora else 0, lora_rank=args.max_lora_rank or 0,
            lora_targets=None if "all" in (args.lora_target_modules or ["all"]) else tuple(args.lora_target_modules),
            cuda_graph_max_bs=0 if args.disable_cuda_graph else args.cuda_graph_max_bs,
            deterministic=args.enable_deterministic_inference, prefill_tokens=prefill_step_tokens(args),
            torchao_config=args.torchao_config,
            draft_model_dir=draft_model_dir(args),
            spec_algorithm=args.speculative_algorithm, spec_topk=args.speculative_eagle_topk or 1,
            spec_steps=args.speculative_num_steps or 0,
            pdmux=args.enable_pdmux, pdmux_decode_sms=args.pdmux_decode_sms,
        ))
        if should_warm_up(self.runner):  # the first prompt's kernels compiled and loaded now, not in its TTFT
            lengths = warmup_lengths(self.runner.device.type == "cuda", prefill_step_tokens(args),
                                     self.runner.cfg.context_len, self.runner.cfg.kv_tokens)
            self.runner.startup_phases["warmup"] = round(warm_up(self.runner, lengths), 3)
        # Overlap scheduling on CUDA: a launched step is answered only once the next plan is queued
        # behind it (or the scheduler asks with SyncStep), so the device never waits for the host.
        self.hold_results = self.runner.device.type == "cuda" and not args.disable_overlap_schedule
        tag = f"TP-{self.rank}"  # trace-file names as SGLang's
        tag += f"-DP-{spec.extra.get('dp_rank', 0)}" if args.dp_size > 1 else ""
        tag += f"-PP-{self.pp_rank}" if args.pp_size > 1 else ""
        self.profiler = Profiler(tag, self.runner.device.type == "cuda",
                                 busy=lambda: beats_while_busy(spec.endpoints["client"], spec.name))
        self.kv_tokens = self.runner.cfg.kv_tokens
        self.load_time = time.perf_counter() - t0
        phases = ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in self.runner.startup_phases.items())
        logger.info("model loaded in %.1f s (%s); KV pool %d tokens, %d request slots", self.load_time, phases,
                    self.kv_tokens, self.max_slots)
        if self.runner.graphs is not None:
            logger.info("CUDA graphs captured for %d batch sizes (up to %d) in %.1f s", len(self.runner.graphs.sizes),
                        self.runner.graphs.max_bs, self.runner.graph_capture_time)
        inbox.send(ChildReady(name=spec.name, info=msgspec.structs.asdict(self.info())))
        engine_rank = spec.extra.get("dp_rank", 0) * args.tp_size * args.pp_size + global_rank
        self.weight_groups = WeightGroups(engine_rank, self.runner.device)
        self.memory = MemoryOccupation(self.runner)
        runner = self.runner
        self.handlers: dict[type, Any] = {
            GetWorkerInfo: lambda c: self.info(),
            StartProfile: lambda c: self.profiler.start(c.options),
            StopProfile: lambda c: self.profiler.stop(),
            ReadLoraAdapter: lambda c: self.runner.load_lora(c.name, c.path),
            DropLoraAdapter: lambda c: self.runner.unload_lora(c.name),
            UpdateWeightsFromDisk: lambda c: reload_weights(
                self.runner.model, c.model_dir, c.load_format, self.runner.model_config, self.runner.cfg.context_len,
                self.runner.device, c.phase),
            UpdateWeightsFromTensor: lambda c: update_from_shared_memory(
                self.runner.model, c, self.runner.model_config, self.runner.cfg.context_len, self.runner.device),
            GetWeightsByName: lambda c: weights_by_name(runner.model, c.name, c.truncate_size,
                                                        runner.model_config),  # {"weights"|"error"}
            InitWeightsUpdateGroup: self.weight_groups.init,
            UpdateWeightsFromDistributed: lambda c: self.weight_groups.update(
                runner.model, c, runner.model_config, runner.cfg.context_len),
            DestroyWeightsUpdateGroup: lambda c: self.weight_groups.destroy(c.group_name),
            ReleaseMemoryOccupation: lambda c: self.memory.release(c.tags),
            ResumeMemoryOccupation: lambda c: self.memory.resume(c.tags),
        }

    def info(self) -> WorkerInfo:
        # the runner's info already holds the pool size, slots and context length this loop gave it
        return WorkerInfo(**self.runner.info(), load_time=self.load_time, pid=os.getpid())

    def serve(self) -> None:
        held = None  # (step, Launched) launched but not answered yet
        while True:
            try:
                msg = self.recv.recv()
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                logger.error("dropped a malformed message: %s", e)
                continue
            if isinstance(msg, ForwardPlan):
                launched = self.runner.launch(msg)
                self.profiler.step()
                if held is not None:
                    self.answer(*held)
                held = (msg.step, launched)
                if self.hold_results:
                    continue
            elif isinstance(msg, Shutdown):
                return
            elif isinstance(msg, Call):
                if held is not None:
                    self.answer(*held)
                    held = None
                reply = self.control(msg)
                if self.to_scheduler is not None:
                    self.to_scheduler.send(reply)
            if held is not None:  # SyncStep, or no overlap
                self.answer(*held)
                held = None

    def answer(self, step: int, launched: Any) -> None:
        ids, extras = self.runner.finish(launched)
        if self.to_scheduler is not None:
            self.to_scheduler.send(StepResult(step=step, next_token_ids=ids, extras=extras))

    def control(self, call: Call) -> Reply:
        try:
            return Reply(call_id=call.call_id, ok=True, result=self.handlers[type(call)](call))
        except Exception as e:  # a failed control call is reported, it does not kill the worker
            if self.to_scheduler is None:  # only the reporting rank's error reaches the user: log the others
                logger.warning("control call %s failed on this rank: %s", type(call).__name__, e)
            return Reply(call_id=call.call_id, ok=False, error=str(e))


def main(spec: ChildSpec, ctx: zmq.Context, inbox: Sender) -> None:
    WorkerLoop(spec, ctx, inbox).serve()
