"""``Engine``: the facade in the user's process, call for call SGLang's native Engine API."""

from __future__ import annotations

import asyncio
import atexit
import functools
import gc
import itertools
import json
import logging
import os
import queue
import threading
import time
import uuid
import weakref
from typing import Any, AsyncIterator, Iterator, Optional, Union

import msgspec
import zmq

from treadle.client.media import attach_media
from treadle.client.request import normalize_generate, refuse_unbuilt, routed_dp_rank
from treadle.client.results import BatchResult, ReqState
from treadle.client.launch import launch_children
from treadle.client.lora import LoraRegistry, LoRAUpdateOutput
from treadle.client.supervisor import Supervisor
from treadle.runtime.errors import EngineDeadError
from treadle.runtime.hf_config import check_quantization
from treadle.runtime.logging_utils import configure_logging
from treadle.runtime.logit_processor import load_processor, processor_reference
from treadle.runtime.messages import AbortReq, ControlReq, GenerateBatch, GenerateReq, SessionParams, Shutdown
from treadle.runtime.model_files import resolve_model_files
from treadle.runtime.procs import kill_child
from treadle.runtime.server_args import ServerArgs, parse_lora_paths
from treadle.runtime.zmq_utils import IpcDir, Sender

logger = logging.getLogger("treadle.engine")
STARTUP_TIMEOUT_S = float(os.environ.get("TREADLE_STARTUP_TIMEOUT", "900"))
CONTROL_TIMEOUT_S = 60.0
_GENERATE_OPTIONS = ("return_logprob", "logprob_start_len", "top_logprobs_num", "token_ids_logprob",
                     "return_hidden_states", "priority", "cache_salt")
class FlushCacheReqOutput:
    def __init__(self, success: bool, message: str = "") -> None:
        self.success, self.message = success, message

    def __bool__(self) -> bool:
        return self.success

    def __repr__(self) -> str:
        return f"FlushCacheReqOutput(success={self.success}, message={self.message!r})"


class Engine:
    """An in-process LLM engine: ``Engine(model_path=...)`` starts the tokenizer, scheduler,
    GPU-worker and detokenizer processes and blocks until the model is loaded."""

    def __init__(self, server_args: Optional[ServerArgs] = None, **kwargs: Any) -> None:
        self._shut_down = True  # so shutdown() is safe if __init__ fails half-way
        if server_args is None:
            server_args = ServerArgs(**kwargs)  # unknown argument: TypeError; bad value: ValueError
        elif kwargs:
            raise TypeError("Pass either server_args or keyword arguments, not both.")
        server_args.check_supported()
        configure_logging(server_args.log_level, "engine")
        t0 = time.perf_counter()
        self.server_args = server_args.resolved()
        self._files = resolve_model_files(self.server_args.model_path, server_args.tokenizer_path)
        check_quantization(self._files.model_dir, self.server_args.quantization)
        self._ipc = IpcDir()
        self._ctx = zmq.Context()
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._processors: dict[str, str] = {}
        pref = self.server_args.preferred_sampling_params  # parsed once, not per call
        self._preferred: Optional[dict[str, Any]] = json.loads(pref) if pref else None
        self._to_tokenizer = Sender(self._ctx, self._ipc.endpoint("tokenizer"))
        self._session_groups: dict[str, int] = {}  # session id -> the DP group holding its KV
        self._timed_sessions: set[str] = set()  # of those, the ones a scheduler may close on its own (timeout)
        self._lora = LoraRegistry(bool(self.server_args.enable_lora), self.server_args.max_loaded_loras)
        launch = functools.partial(launch_children, self.server_args, self._files, self._ipc)
        self._sup = Supervisor(self._ctx, self._ipc.endpoint("client"), launch,
                               self.server_args.incremental_streaming_output,
                               report=self._report if self.server_args.dp_size > 1 else None)
        self._sup.workers_only = self.server_args.node_rank > 0
        self._shut_down = False
        ref = weakref.ref(self)
        atexit.register(lambda: (e := ref()) is not None and e.shutdown())
        self._sup.thread.start()
        try:
            self._sup.started.result(timeout=STARTUP_TIMEOUT_S)
        except BaseException as e:
            self.shutdown()
            if isinstance(e, TimeoutError):
                raise RuntimeError(f"Engine start-up took longer than {STARTUP_TIMEOUT_S:.0f} s.") from None
            raise
        for name, path, pinned in parse_lora_paths(self.server_args.lora_paths):
            res = self.load_lora_adapter(name, path, pinned)
            if not res.success:
                self.shutdown()
                raise ValueError(f"lora_paths: cannot load adapter {name!r} from {path!r}: {res.error_message}")
        self._startup_time = time.perf_counter() - t0
        logger.info("engine ready in %.1f s (model %s, device %s)", self._startup_time,
                    self.server_args.model_path, self.server_args.device)
        if self.server_args.node_rank > 0:
            self._serve_worker_node()

    # ------------------------------------------------------------------ start-up
    def _serve_worker_node(self) -> None:
        """``node_rank > 0`` runs only its worker ranks, which node 0's scheduler drives. As SGLang,
        block until they exit (node 0 shut down, or a rank failed), then clean up; with
        ``TREADLE_BLOCK_NONZERO_RANK_CHILDREN=0`` (or SGLang's variable) return at once and keep the
        workers until ``shutdown()``."""
        block = [os.environ.get(f"{p}_BLOCK_NONZERO_RANK_CHILDREN") for p in ("TREADLE", "SGLANG")]
        if next((b for b in block if b is not None), "1") == "0":
            return
        try:
            while all(p.poll() is None for p in self._sup.procs.values()):
                time.sleep(0.2)
        finally:
            self.shutdown()

    # ------------------------------------------------------------------ generation
    def generate(
        self, prompt: Union[str, list[str], None] = None, sampling_params: Union[dict, list[dict], None] = None,
        input_ids: Union[list[int], list[list[int]], None] = None, image_data: Any = None,
        audio_data: Any = None, video_data: Any = None, return_logprob: Union[bool, list[bool]] = False, logprob_start_len: Union[int, list[int], None] = None,
        top_logprobs_num: Union[int, list[int], None] = None, token_ids_logprob: Optional[list] = None,
        lora_path: Any = None, custom_logit_processor: Any = None, return_hidden_states: Any = False,
        stream: bool = False, rid: Union[str, list[str], None] = None, session_params: Optional[dict] = None,
        priority: Optional[int] = None, routed_dp_rank: Optional[int] = None, data_parallel_rank: Optional[int] = None,
        cache_salt: Union[str, list[str], None] = None, **unsupported: Any,
    ) -> Union[dict, BatchResult, Iterator[dict]]:
        """Generate for one prompt (returns a dict), a batch (a ``BatchResult`` list), or stream chunks."""
        reqs, is_batch = self._prepare(locals())
        if stream:
            return self._stream_sync(reqs, is_batch)
        q: queue.SimpleQueue = queue.SimpleQueue()
        call_id = self._submit(reqs, q.put, is_batch)
        return self._collect_sync(q, call_id, len(reqs), is_batch)

    async def async_generate(
        self, prompt: Union[str, list[str], None] = None, sampling_params: Union[dict, list[dict], None] = None,
        input_ids: Union[list[int], list[list[int]], None] = None, image_data: Any = None,
        audio_data: Any = None, video_data: Any = None, return_logprob: Union[bool, list[bool]] = False, logprob_start_len: Union[int, list[int], None] = None,
        top_logprobs_num: Union[int, list[int], None] = None, token_ids_logprob: Optional[list] = None,
        lora_path: Any = None, custom_logit_processor: Any = None, return_hidden_states: Any = False,
        stream: bool = False, rid: Union[str, list[str], None] = None, session_params: Optional[dict] = None,
        priority: Optional[int] = None, routed_dp_rank: Optional[int] = None, data_parallel_rank: Optional[int] = None,
        cache_salt: Union[str, list[str], None] = None, **unsupported: Any,
    ) -> Union[dict, BatchResult, AsyncIterator[dict]]:
        """The async twin of ``generate``; runs on the caller's own event loop."""
        reqs, is_batch = self._prepare(locals())
        if stream:
            return self._stream_async(reqs, is_batch)
        return await self._run_async(reqs, is_batch)

    def _prepare(self, call: dict[str, Any]) -> tuple[list[GenerateReq], bool]:
        self._check_alive()
        if self.server_args.is_embedding:
            raise ValueError("This engine serves an embedding model (is_embedding=True): use encode(), not generate().")
        unsupported = call.pop("unsupported")
        refuse_unbuilt(unsupported)
        if unsupported:
            raise TypeError(f"generate() got unexpected keyword argument(s): {', '.join(sorted(unsupported))}")
        if call["audio_data"] is not None:
            raise ValueError("audio_data: Treadle serves no audio models; images and videos go to a LLaVA model.")
        hidden = call["return_hidden_states"]
        if (any(hidden) if isinstance(hidden, list) else hidden) and not self.server_args.enable_return_hidden_states:
            raise ValueError("The server is not configured to return hidden states. "
                             "Start the engine with enable_return_hidden_states=True.")
        salt = call["cache_salt"]
        if salt is not None and not (isinstance(salt, str) or (
                isinstance(salt, list) and all(x is None or isinstance(x, str) for x in salt))):
            raise TypeError(f"cache_salt must be a str (or, for a batch, a list of str), got {type(salt).__name__}.")
        options = {k: call[k] for k in _GENERATE_OPTIONS if call[k] is not None}
        if call["lora_path"] is not None:
            options["lora_name"] = self._lora.resolve(call["lora_path"])
        if call["custom_logit_processor"] is not None:
            options.update(self._resolve_processors(call["custom_logit_processor"]))
        reqs, is_batch = normalize_generate(call["prompt"], call["input_ids"], call["sampling_params"], call["rid"],
                                            call["stream"], options, self._preferred)
        attach_media(reqs, call["prompt"], call["input_ids"], call["image_data"], call["video_data"])
        dp_rank = routed_dp_rank(call["routed_dp_rank"], call["data_parallel_rank"], self.server_args.dp_size)
        if dp_rank is not None:
            for r in reqs:
                r.dp_rank = dp_rank
        if call["session_params"] is not None:
            session = _session_params(call["session_params"])
            if len(reqs) != 1:
                raise ValueError("session_params needs a single prompt with n=1 (each call is one turn).")
            reqs[0].session = session
            reqs[0].dp_rank = self._session_groups.get(session.id)  # a session's turns run where its KV is
        return reqs, is_batch

    def _resolve_processors(self, procs: Any) -> dict[str, Any]:
        """Import paths (and instance states) of the requested processors, checked here so a bad one
        fails this call, never the worker."""
        if not self.server_args.enable_custom_logit_processor:
            raise ValueError("The server is not configured to enable custom logit processor. "
                             "Start the engine with enable_custom_logit_processor=True.")
        items = procs if isinstance(procs, list) else [procs]
        paths, states = [], []
        for proc in items:
            if proc is None:
                paths.append(None), states.append(None)
                continue
            path, state = processor_reference(proc, self._processors)
            try:
                load_processor(path, state)
            except Exception as e:  # noqa: BLE001 - any import problem is the caller's input error
                raise ValueError(f"custom_logit_processor {path!r} cannot be loaded: {e}") from None
            paths.append(path), states.append(state)
        if not isinstance(procs, list):
            return {"custom_logit_processor": paths[0], "custom_state": states[0]}
        return {"custom_logit_processor": paths, "custom_state": states}

    def register_custom_logit_processor(self, name: str, processor: Any) -> None:
        """Make ``custom_logit_processor=name`` refer to a processor class, instance or import path."""
        if not isinstance(name, str) or not name:
            raise ValueError("name must be a non-empty string.")
        self._processors[name] = processor if isinstance(processor, str) else processor_reference(processor, {})[0]

    # ------------------------------------------------------------------ embeddings
    def encode(self, prompt: Union[str, list[str], list[int], list[list[int]]], image_data: Any = None,
               rid: Union[str, list[str], None] = None, lora_path: Any = None, **unsupported: Any
               ) -> Union[dict, BatchResult]:
        """Embed one input (returns ``{"embedding": [...], "meta_info": {...}}``) or a batch (a
        ``BatchResult``: ``res["embedding"]`` lists the vectors). Inputs are text or token ids."""
        reqs, is_batch = self._prepare_encode(prompt, image_data, rid, lora_path, unsupported)
        q: queue.SimpleQueue = queue.SimpleQueue()
        call_id = self._submit(reqs, q.put, is_batch)
        return self._collect_sync(q, call_id, len(reqs), is_batch)

    async def async_encode(self, prompt: Union[str, list[str], list[int], list[list[int]]], image_data: Any = None,
                           rid: Union[str, list[str], None] = None, lora_path: Any = None, **unsupported: Any
                           ) -> Union[dict, BatchResult]:
        """The async twin of ``encode``; runs on the caller's own event loop."""
        reqs, is_batch = self._prepare_encode(prompt, image_data, rid, lora_path, unsupported)
        return await self._run_async(reqs, is_batch)

    def _prepare_encode(self, prompt: Any, image_data: Any, rid: Any, lora_path: Any, unsupported: dict
                        ) -> tuple[list[GenerateReq], bool]:
        self._check_alive()
        if unsupported:
            raise TypeError(f"encode() got unexpected keyword argument(s): {', '.join(sorted(unsupported))}")
        if image_data is not None:
            raise ValueError("image_data: encode() takes text only here; no multimodal embedding model is supported.")
        if not self.server_args.is_embedding:
            raise ValueError("This model does not appear to be an embedding model by default. "
                             "Start the engine with is_embedding=True to use encode().")
        ids_input = isinstance(prompt, list) and prompt and (isinstance(prompt[0], int) or isinstance(prompt[0], list))
        lora = self._lora.resolve(lora_path)
        options = {} if lora is None else {"lora_name": lora}
        reqs, is_batch = normalize_generate(None if ids_input else prompt, prompt if ids_input else None,
                                            {"max_new_tokens": 0}, rid, False, options)
        for r in reqs:
            r.embed = True
        return reqs, is_batch

    async def _run_async(self, reqs: list[GenerateReq], is_batch: bool) -> Union[dict, BatchResult]:
        """Submit a call and await all its results on the caller's event loop."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        call_id = self._submit(reqs, lambda item: loop.call_soon_threadsafe(q.put_nowait, item), is_batch)
        results: list[Any] = [None] * len(reqs)
        try:
            for _ in range(len(reqs)):
                idx, item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                results[idx] = item
        finally:
            self._end_call(call_id)
        return BatchResult(results) if is_batch else results[0]

    def _collect_sync(self, q: queue.SimpleQueue, call_id: int, n: int, is_batch: bool) -> Union[dict, BatchResult]:
        results: list[Any] = [None] * n
        try:
            for _ in range(n):
                idx, item = q.get()
                if isinstance(item, BaseException):
                    raise item
                results[idx] = item
        finally:
            self._end_call(call_id)
        return BatchResult(results) if is_batch else results[0]


    def _submit(self, reqs: list[GenerateReq], put: Any, is_batch: bool) -> int:
        call_id = next(self._ids)
        states = []
        for i, r in enumerate(reqs):
            want = (r.return_logprob, r.top_logprobs_num > 0, bool(r.token_ids_logprob), bool(r.return_hidden_states))
            st = ReqState(r.rid, r.created, lambda item, i=i: put((i, item)), index=i if is_batch else None, want=want,
                          weight_version=self.server_args.weight_version)
            states.append((st, r.stream))
        payload = _checked_payload(GenerateBatch(call_id=call_id, reqs=reqs))
        self._sup.register(call_id, states)
        try:
            with self._send_lock:
                self._to_tokenizer.send_bytes(payload)
        except BaseException:
            self._sup.unregister_call(call_id)
            raise
        return call_id

    def _end_call(self, call_id: int) -> None:
        """Abort whatever is still running of a call that ended early (error, Ctrl-C, closed stream)."""
        for rid in self._sup.unregister_call(call_id):
            if not self._shut_down and self._sup.dead is None:
                self._send(AbortReq(rid=rid))

    def _stream_sync(self, reqs: list[GenerateReq], is_batch: bool) -> Iterator[dict]:
        q: queue.SimpleQueue = queue.SimpleQueue()
        call_id = self._submit(reqs, q.put, is_batch)

        def chunks() -> Iterator[dict]:
            pending = len(reqs)
            try:
                while pending:
                    _, item = q.get()
                    if isinstance(item, BaseException):
                        raise item
                    if item["meta_info"]["finish_reason"] is not None:
                        pending -= 1
                    yield item
            finally:
                self._end_call(call_id)

        return chunks()

    async def _stream_async(self, reqs: list[GenerateReq], is_batch: bool) -> AsyncIterator[dict]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        call_id = self._submit(reqs, lambda item: loop.call_soon_threadsafe(q.put_nowait, item), is_batch)
        pending = len(reqs)
        try:
            while pending:
                _, item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                if item["meta_info"]["finish_reason"] is not None:
                    pending -= 1
                yield item
        finally:
            self._end_call(call_id)

    # ------------------------------------------------------------------ control
    def abort_request(self, rid: Optional[str] = None, abort_all: bool = False) -> None:
        """Abort by request id (also ``rid_0``, ``rid_1``... of a batch) or everything; the aborted
        calls return normally with ``finish_reason["type"] == "abort"``."""
        if not rid and not abort_all:
            return
        self._check_alive()
        self._send(AbortReq(rid=rid or "", abort_all=abort_all))

    async def async_abort_request(self, rid: Optional[str] = None, abort_all: bool = False) -> None:
        self.abort_request(rid, abort_all)

    def flush_cache(self) -> FlushCacheReqOutput:
        ok = all(res.get("success") for res in self._control_each("flush_cache").values())
        return FlushCacheReqOutput(ok, "" if ok else "Cache not flushed because there is pending work.")

    def open_session(self, capacity_of_str_len: int, session_id: Optional[str] = None, streaming: bool = False,
                     timeout: Optional[float] = None) -> Optional[str]:
        """Open a multi-turn session; returns its id, or None if ``session_id`` is already open.

        ``timeout``: close it after that many seconds without a new turn. ``streaming``: one turn at
        a time, each appended to the latest (needs ``enable_streaming_session``)."""
        if not isinstance(capacity_of_str_len, int) or capacity_of_str_len < 0:
            raise ValueError(f"capacity_of_str_len must be a non-negative int, got {capacity_of_str_len!r}.")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}.")
        if streaming and not self.server_args.enable_streaming_session:
            raise ValueError("Streaming sessions are disabled. Please relaunch with --enable-streaming-session.")
        sid = session_id or uuid.uuid4().hex
        self._forget_expired_sessions()
        # A session lives in one DP group (its KV stays cached there): the one holding the fewest;
        # an id seen before asks its own group (which says no while it is open there).
        g = self._session_groups.get(sid)
        if g is None or g not in self._sup.live_groups():
            g = min(self._sup.live_groups(), key=lambda r: (list(self._session_groups.values()).count(r), r))
        if not self._control_each("open_session", [g], session_id=sid, timeout=timeout, streaming=bool(streaming))[g]:
            return None
        self._session_groups[sid] = g
        if timeout is not None:
            self._timed_sessions.add(sid)
        return sid

    def _forget_expired_sessions(self) -> None:
        """Drop the sessions that their scheduler closed on timeout from the session -> group map
        (asks the groups, only while such sessions are tracked): otherwise they would count
        against their group when new sessions are placed, and the map would grow for ever."""
        if not self._timed_sessions:
            return
        open_ids = set().union(*self._control_each("open_session_ids").values())
        for sid in self._timed_sessions - open_ids:
            self._session_groups.pop(sid, None)
        self._timed_sessions &= open_ids

    def close_session(self, session_id: str) -> None:
        """Close a session and release the KV it kept cached (an unknown id is ignored)."""
        self._timed_sessions.discard(session_id)
        g = self._session_groups.pop(session_id, None)
        if g is None or g in self._sup.live_groups():
            self._control_each("close_session", None if g is None else [g], session_id=session_id)

    def freeze_gc(self) -> None:
        """``gc.freeze()`` in the scheduler, the detokenizer and this process (call after warm-up)."""
        self._control("freeze_gc")
        gc.freeze()

    def start_profile(self, **kwargs: Any) -> None:
        """Start torch profiler traces in every worker (SGLang's ``ProfileReq`` fields: ``output_dir``,
        ``num_steps``, ``activities``, ``with_stack``, ``record_shapes``, ``profile_id``,
        ``profile_prefix``; ``profile_dir``/``profile_name`` also work). Unknown names: ``TypeError``."""
        from treadle.gpu_worker.profiler import check_profile_args

        check_profile_args(kwargs)
        self._control("start_profile", **kwargs)

    def stop_profile(self) -> None:
        """Stop profiling and write each worker's trace (``RuntimeError`` if none was started)."""
        self._control("stop_profile")

    def get_server_info(self) -> dict[str, Any]:
        states = self._control_each("get_internal_state")
        state = next(iter(states.values()))
        worker = self._sup.ready_info.get("worker0", {})
        info = dict(self.server_args.to_dict())
        info.update({
            "model_path": self.server_args.model_path, "resolved_model_dir": self._files.model_dir,
            "tokenizer_path": self.server_args.tokenizer_path, "max_total_tokens": state["max_total_tokens"],
            "max_running_requests": state["max_running_requests"], "context_length": state["context_length"],
            "page_size": state["page_size"], "device": self.server_args.device, "dtype": worker.get("dtype"),
            "startup_time": self._startup_time, "version": _version(),
            "internal_states": [{**s, "dp_rank": g} for g, s in states.items()],  # one per live DP group
        })
        if self.server_args.dp_size > 1:  # per group: alive, error (why not), requests in flight, served
            info["dp_groups"] = self._control_each("get_load", [-1])[-1]
        return info

    # ------------------------------------------------------------------ LoRA
    def load_lora_adapter(self, lora_name: str, lora_path: str, pinned: bool = False) -> LoRAUpdateOutput:
        """Load a PEFT adapter directory on every worker and serve it as ``lora_path=lora_name``;
        failures are returned (``success=False`` with a message), as SGLang's."""
        return self._lora.load(self._control_each, lora_name, lora_path, pinned)

    def unload_lora_adapter(self, lora_name: str) -> LoRAUpdateOutput:
        """New requests naming the adapter fail from now on; the workers drop it once the requests
        already using it have finished."""
        return self._lora.unload(self._control_each, lora_name)

    async def async_load_lora_adapter(self, lora_name: str, lora_path: str, pinned: bool = False) -> LoRAUpdateOutput:
        return await asyncio.to_thread(self.load_lora_adapter, lora_name, lora_path, pinned)

    async def async_unload_lora_adapter(self, lora_name: str) -> LoRAUpdateOutput:
        return await asyncio.to_thread(self.unload_lora_adapter, lora_name)

    def get_all_child_pids(self) -> list[int]:
        return [p.pid for p in self._sup.procs.values()]

    def _control(self, method: str, **args: Any) -> Any:
        """A control call on every live DP group; returns the first group's result."""
        return next(iter(self._control_each(method, **args).values()))

    def _control_each(self, method: str, groups: Optional[list[int]] = None, **args: Any) -> dict[int, Any]:
        """A control call on each of ``groups`` (default: every live DP group; -1 is the tokenizer),
        results by group. Each group gets its own call id, so a group that dies fails its own call."""
        self._check_alive()
        futs = {}
        for g in self._sup.live_groups() if groups is None else groups:
            call_id = next(self._ids)
            futs[g] = self._sup.add_control(call_id, g)
            self._send(ControlReq(call_id=call_id, method=method, args=args, dp_rank=g))
        return {g: fut.result(timeout=CONTROL_TIMEOUT_S) for g, fut in futs.items()}

    # ------------------------------------------------------------------ lifecycle
    def _send(self, msg: Any) -> None:
        with self._send_lock:
            self._to_tokenizer.send(msg)

    def _report(self, msg: Any) -> None:
        """DP bookkeeping for the tokenizer's router (``ReqsDone``, ``GroupDown``), from the I/O thread."""
        try:
            self._send(msg)
        except zmq.ZMQError:  # shutting down
            pass

    def _check_alive(self) -> None:
        a = self.server_args
        if a.node_rank > 0:
            raise RuntimeError(f"This engine is node_rank={a.node_rank} of nnodes={a.nnodes}: it only runs worker "
                               "ranks. Send requests to the node_rank=0 engine.")
        if self._shut_down:
            raise EngineDeadError("The engine has been shut down.")
        if self._sup.dead is not None:
            raise self._sup.dead

    def shutdown(self) -> None:
        """Stop every child, remove the socket directory. Idempotent; also runs at exit."""
        if self._shut_down:
            return
        self._shut_down = True
        try:
            with self._send_lock:
                self._to_tokenizer.send(Shutdown())
        except zmq.ZMQError:
            pass
        procs = list(self._sup.procs.values())
        self._sup.stop("The engine has been shut down.")
        deadline = time.monotonic() + 2.0
        for p in procs:
            kill_child(p, grace_s=max(0.0, deadline - time.monotonic()))
        self._to_tokenizer.close()
        self._ctx.term()
        self._ipc.remove()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass


_WIRE_CHECK = msgspec.msgpack.Decoder(GenerateBatch)


def _session_params(d: Any) -> SessionParams:
    """SGLang's ``session_params`` dict (``id`` or ``session_id``, ``rid``, ``offset``, ``replace``,
    ``drop_previous_output``)."""
    if not isinstance(d, dict):
        raise TypeError("session_params must be a dict.")
    d = dict(d)
    if "session_id" in d:
        d.setdefault("id", d.pop("session_id"))
    try:
        return msgspec.convert(d, SessionParams)
    except msgspec.ValidationError as e:
        raise ValueError(f"Invalid session_params: {e}") from None


def _checked_payload(batch: GenerateBatch) -> bytes:
    """Encode a call and check it decodes as the tokenizer will: a wrong type anywhere (say a str
    where a bool belongs) is this call's ``ValueError``, never a frame the tokenizer must drop."""
    payload = msgspec.msgpack.encode(batch)
    try:
        _WIRE_CHECK.decode(payload)
    except msgspec.ValidationError as e:
        raise ValueError(f"Invalid request: {e}".replace("$.reqs[0].", "").replace("$.reqs", "reqs")) from None
    return payload


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("treadle")
    except PackageNotFoundError:
        return "0.0.0"
