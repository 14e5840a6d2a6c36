"""``Engine``: the facade in the user's process, call for call SGLang's native Engine API.

The work is done beside it: ``prepare.py`` turns a call into checked requests, ``calls.py`` sends
them and waits for the results, ``control.py`` makes the control calls, ``sessions.py`` places
sessions on DP groups, and the I/O thread (``supervisor.py``) runs the children and routes their
messages.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import gc
import logging
import os
import time
import weakref
from typing import Any, AsyncIterator, Iterator, Optional, Union

import zmq

from treadle.client.calls import Calls, TokenizerSocket
from treadle.client.control import Control, FlushCacheReqOutput
from treadle.client.engine_rl import RLMethods
from treadle.client.launch import launch_children, serve_worker_node
from treadle.client.lora import LoraRegistry, LoRAUpdateOutput
from treadle.client.model_info import model_info
from treadle.client.prepare import RequestBuilder
from treadle.client.results import BatchResult
from treadle.client.scoring import ScoringCalls
from treadle.client.sessions import Sessions
from treadle.client.supervisor import Supervisor
from treadle.client.tokenizer_manager import TokenizerManager
from treadle.client.weights import WeightUpdates
from treadle.runtime.hf_config import check_quantization, load_config
from treadle.runtime.model_check import check_model, is_embedding_model
from treadle.runtime.logging_utils import configure_logging
from treadle.runtime.messages import Shutdown
from treadle.runtime.model_files import model_files_of
from treadle.runtime.procs import kill_child
from treadle.runtime.lora_args import parse_lora_paths
from treadle.runtime.server_args import ServerArgs
from treadle.runtime.zmq_utils import IpcDir

__all__ = ["Engine", "FlushCacheReqOutput"]

logger = logging.getLogger("treadle.engine")
STARTUP_TIMEOUT_S = float(os.environ.get("TREADLE_STARTUP_TIMEOUT", "900"))


class Engine(RLMethods, ScoringCalls):  # rerank / score: client/scoring.py
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
        self.server_args = a = server_args.resolved()
        self._files = model_files_of(a)  # a hub id is downloaded here, once, before any child starts
        check_quantization(self._files.model_dir, a.quantization, a.load_format)
        check_model(self._files.model_dir, a)
        a.is_embedding = a.is_embedding or is_embedding_model(self._files.model_dir)
        self._ipc = IpcDir()
        self._ctx = zmq.Context()
        self._sessions = Sessions(bool(a.enable_streaming_session))
        self._socket = TokenizerSocket(self._ctx, self._ipc.endpoint("tokenizer"))
        launch = functools.partial(launch_children, a, self._files, self._ipc)
        self._sup = Supervisor(self._ctx, self._ipc.endpoint("client"), launch, a.incremental_streaming_output,
                               report=self._socket.send_quietly if a.dp_size > 1 else None)
        self._sup.workers_only = a.node_rank > 0
        self._calls = Calls(self._socket, self._sup, a)
        self._control_calls = Control(self._calls, self._sup)
        self._lora = LoraRegistry(bool(a.enable_lora), a.max_loaded_loras, self._control_calls)
        self._requests = RequestBuilder(a, self._lora, self._sessions.group_of, load_config(self._files.model_dir))
        self._weights = WeightUpdates(self._control_calls, a)
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
        for name, path, pinned in parse_lora_paths(a.lora_paths):
            res = self.load_lora_adapter(name, path, pinned)
            if not res.success:
                self.shutdown()
                raise ValueError(f"lora_paths: cannot load adapter {name!r} from {path!r}: {res.error_message}")
        self._startup_time = time.perf_counter() - t0
        logger.info("engine ready in %.1f s (model %s, device %s)", self._startup_time, a.model_path, a.device)
        if a.node_rank > 0:
            serve_worker_node(self._sup.procs, self.shutdown)

    # ------------------------------------------------------------------ generation
    def generate(
        self, prompt: Union[str, list[str], None] = None, sampling_params: Union[dict, list[dict], None] = None,
        input_ids: Union[list[int], list[list[int]], None] = None, image_data: Any = None,
        audio_data: Any = None, video_data: Any = None, return_logprob: Union[bool, list[bool]] = False,
        logprob_start_len: Union[int, list[int], None] = None,
        top_logprobs_num: Union[int, list[int], None] = None, token_ids_logprob: Optional[list] = None,
        lora_path: Any = None, custom_logit_processor: Any = None, return_hidden_states: Any = False,
        stream: bool = False, rid: Union[str, list[str], None] = None, session_params: Optional[dict] = None,
        priority: Optional[int] = None, routed_dp_rank: Optional[int] = None, data_parallel_rank: Optional[int] = None,
        cache_salt: Union[str, list[str], None] = None, **unsupported: Any,
    ) -> Union[dict, BatchResult, Iterator[dict]]:
        """Generate for one prompt (returns a dict), a batch (a ``BatchResult`` list), or stream chunks."""
        self._calls.check_alive()
        reqs, is_batch = self._requests.generate(
            prompt=prompt, sampling_params=sampling_params, input_ids=input_ids, image_data=image_data,
            audio_data=audio_data, video_data=video_data, return_logprob=return_logprob,
            logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num,
            token_ids_logprob=token_ids_logprob, lora_path=lora_path, custom_logit_processor=custom_logit_processor,
            return_hidden_states=return_hidden_states, stream=stream, rid=rid, session_params=session_params,
            priority=priority, routed_dp_rank=routed_dp_rank, data_parallel_rank=data_parallel_rank,
            cache_salt=cache_salt, unsupported=unsupported)
        if stream:
            return self._calls.stream_sync(reqs, is_batch)
        return self._calls.run_sync(reqs, is_batch)

    async def async_generate(
        self, prompt: Union[str, list[str], None] = None, sampling_params: Union[dict, list[dict], None] = None,
        input_ids: Union[list[int], list[list[int]], None] = None, image_data: Any = None,
        audio_data: Any = None, video_data: Any = None, return_logprob: Union[bool, list[bool]] = False,
        logprob_start_len: Union[int, list[int], None] = None,
        top_logprobs_num: Union[int, list[int], None] = None, token_ids_logprob: Optional[list] = None,
        lora_path: Any = None, custom_logit_processor: Any = None, return_hidden_states: Any = False,
        stream: bool = False, rid: Union[str, list[str], None] = None, session_params: Optional[dict] = None,
        priority: Optional[int] = None, routed_dp_rank: Optional[int] = None, data_parallel_rank: Optional[int] = None,
        cache_salt: Union[str, list[str], None] = None, **unsupported: Any,
    ) -> Union[dict, BatchResult, AsyncIterator[dict]]:
        """The async twin of ``generate``; runs on the caller's own event loop."""
        self._calls.check_alive()
        await self._lora.reload_evicted_async(lora_path)  # a reload waits on the workers: not on this loop
        reqs, is_batch = self._requests.generate(
            prompt=prompt, sampling_params=sampling_params, input_ids=input_ids, image_data=image_data,
            audio_data=audio_data, video_data=video_data, return_logprob=return_logprob,
            logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num,
            token_ids_logprob=token_ids_logprob, lora_path=lora_path, custom_logit_processor=custom_logit_processor,
            return_hidden_states=return_hidden_states, stream=stream, rid=rid, session_params=session_params,
            priority=priority, routed_dp_rank=routed_dp_rank, data_parallel_rank=data_parallel_rank,
            cache_salt=cache_salt, unsupported=unsupported)
        if stream:
            return self._calls.stream_async(reqs, is_batch)
        return await self._calls.run_async(reqs, is_batch)

    def register_custom_logit_processor(self, name: str, processor: Any) -> None:
        """Make ``custom_logit_processor=name`` refer to a processor class, instance or import path."""
        self._requests.register_processor(name, processor)

    # ------------------------------------------------------------------ embeddings
    def encode(self, prompt: Union[str, list[str], list[int], list[list[int]]], image_data: Any = None,
               rid: Union[str, list[str], None] = None, lora_path: Any = None, dimensions: Optional[int] = None,
               **unsupported: Any) -> Union[dict, BatchResult]:
        """Embed one input (returns ``{"embedding": [...], "meta_info": {...}}``) or a batch (a
        ``BatchResult``: ``res["embedding"]`` lists the vectors). Inputs are text or token ids.
        ``dimensions``: a Matryoshka model's first N values, normalized after the cut."""
        self._calls.check_alive()
        reqs, is_batch = self._requests.encode(prompt, image_data, rid, lora_path, unsupported, dimensions)
        return self._calls.run_sync(reqs, is_batch)

    async def async_encode(self, prompt: Union[str, list[str], list[int], list[list[int]]], image_data: Any = None,
                           rid: Union[str, list[str], None] = None, lora_path: Any = None,
                           dimensions: Optional[int] = None, **unsupported: Any) -> Union[dict, BatchResult]:
        """The async twin of ``encode``; runs on the caller's own event loop."""
        self._calls.check_alive()
        await self._lora.reload_evicted_async(lora_path)
        reqs, is_batch = self._requests.encode(prompt, image_data, rid, lora_path, unsupported, dimensions)
        return await self._calls.run_async(reqs, is_batch)

    # ------------------------------------------------------------------ control
    def abort_request(self, rid: Optional[str] = None, abort_all: bool = False) -> None:
        """Abort by request id (also ``rid_0``, ``rid_1``... of a batch) or everything; the aborted
        calls return normally with ``finish_reason["type"] == "abort"``."""
        if not rid and not abort_all:
            return
        self._calls.check_alive()
        self._calls.abort(rid or "", abort_all)

    async def async_abort_request(self, rid: Optional[str] = None, abort_all: bool = False) -> None:
        self.abort_request(rid, abort_all)

    def flush_cache(self) -> FlushCacheReqOutput:
        return self._control_calls.flush_cache()

    def open_session(self, capacity_of_str_len: int, session_id: Optional[str] = None, streaming: bool = False,
                     timeout: Optional[float] = None) -> Optional[str]:
        """Open a multi-turn session; returns its id, or None if ``session_id`` is already open.

        ``timeout``: close it after that many seconds without a new turn. ``streaming``: one turn at
        a time, each appended to the latest (needs ``enable_streaming_session``)."""
        return self._sessions.open(self._control_calls, capacity_of_str_len, session_id, streaming, timeout)

    def close_session(self, session_id: str) -> None:
        """Close a session and release the KV it kept cached (an unknown id is ignored)."""
        self._sessions.close(self._control_calls, session_id)

    def freeze_gc(self) -> None:
        """``gc.freeze()`` in the scheduler, the detokenizer and this process (call after warm-up)."""
        self._control_calls.freeze_gc()
        gc.freeze()

    def start_profile(self, **kwargs: Any) -> None:
        """Start torch profiler traces in every worker (SGLang's ``ProfileReq`` fields: ``output_dir``,
        ``num_steps``, ``activities``, ``with_stack``, ``record_shapes``, ``profile_id``,
        ``profile_prefix``; ``profile_dir``/``profile_name`` also work). Unknown names: ``TypeError``."""
        self._control_calls.start_profile(kwargs)

    def stop_profile(self) -> None:
        """Stop profiling and write each worker's trace; returns once the traces are on disk, however
        long that takes (``RuntimeError`` if none was started)."""
        self._control_calls.stop_profile()

    def get_server_info(self) -> dict[str, Any]:
        return self._control_calls.server_info(self.server_args, self._files.model_dir, self._startup_time)

    def get_model_info(self) -> dict[str, Any]:
        """SGLang's model facts: path, ``is_generation``, current ``weight_version``... (client/model_info.py)."""
        return model_info(self.server_args, self._files.model_dir)

    def _check_integrity(self) -> dict[str, Any]:
        """The scheduler's internal state after it asserted that nothing leaked (no public SGLang
        method; the tests call it at idle)."""
        return self._control_calls.check_integrity()

    # ------------------------------------------------------------------ LoRA
    def load_lora_adapter(self, lora_name: str, lora_path: str, pinned: bool = False) -> LoRAUpdateOutput:
        """Load a PEFT adapter directory on every worker and serve it as ``lora_path=lora_name``;
        failures are returned (``success=False`` with a message), as SGLang's."""
        return self._lora.load(lora_name, lora_path, pinned)

    def unload_lora_adapter(self, lora_name: str) -> LoRAUpdateOutput:
        """New requests naming the adapter fail from now on; the workers drop it once the requests
        already using it have finished."""
        return self._lora.unload(lora_name)

    async def async_load_lora_adapter(self, lora_name: str, lora_path: str, pinned: bool = False) -> LoRAUpdateOutput:
        return await asyncio.to_thread(self.load_lora_adapter, lora_name, lora_path, pinned)

    async def async_unload_lora_adapter(self, lora_name: str) -> LoRAUpdateOutput:
        return await asyncio.to_thread(self.unload_lora_adapter, lora_name)

    # ------------------------------------------------------------------ lifecycle
    @functools.cached_property
    def tokenizer_manager(self) -> TokenizerManager:
        """What frameworks read off SGLang's ``engine.tokenizer_manager``: ``tokenizer``,
        ``context_len``, ``server_args`` (client/tokenizer_manager.py)."""
        return TokenizerManager(self.server_args, self._files.tokenizer_dir, self.get_server_info)

    def get_tokenizer(self) -> Any:
        """The served model's Hugging Face tokenizer, loaded in this process on first use."""
        return self.tokenizer_manager.tokenizer

    def get_all_child_pids(self) -> list[int]:
        return [p.pid for p in self._sup.procs.values()]

    def shutdown(self) -> None:
        """Stop every child, remove the socket directory. Idempotent; also runs at exit."""
        if self._shut_down:
            return
        self._shut_down = True
        self._calls.closed = True  # no new calls from now on, and no aborts of the ones cut short
        self._socket.send_quietly(Shutdown())
        procs = list(self._sup.procs.values())
        self._sup.stop("The engine has been shut down.")
        deadline = time.monotonic() + 2.0
        for p in procs:
            kill_child(p, grace_s=max(0.0, deadline - time.monotonic()))
        self._socket.close()
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
