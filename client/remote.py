"""``RemoteEngine``: the ``Engine`` API over HTTP, against ``treadle serve`` (SGLang's native routes).

Code switches between in-process and remote by one line::

    engine = Engine(model_path="default")           # in this process
    engine = RemoteEngine("http://127.0.0.1:30000")  # behind `treadle serve`

The calls take the same arguments and return the same shapes (dicts, ``BatchResult`` for batches,
the same chunk dicts when streaming, ``FlushCacheReqOutput``, ``LoRAUpdateOutput``) and raise the
same exceptions: the server's 400 is a ``ValueError`` (also a ``TypeError``) with the server's
message, an overloaded engine ``EngineOverloadedError``, a dead engine, a 5xx or an unreachable
server ``EngineDeadError`` naming the URL. ``remote_http.py`` holds the connection (httpx clients), ``remote_wire.py``
the status-to-exception mapping, ``remote_args.py`` the argument conversion, ``remote_stream.py``
the streams.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, AsyncIterator, Iterator, Optional, Union


from treadle.client.control import FlushCacheReqOutput
from treadle.client.lora import LoRAUpdateOutput
from treadle.client.remote_stream import AsyncRemoteStream, RemoteStream
from treadle.client.remote_args import encode_body_of, generate_body, processor_json, server_args_of
from treadle.client.remote_http import HttpConnection
from treadle.client.remote_wire import decode_json, result_of
from treadle.client.results import BatchResult
from treadle.runtime.server_args import ServerArgs

__all__ = ["RemoteEngine"]

class RemoteEngine:
    """The ``Engine`` API of a ``treadle serve`` server at ``url``. ``api_key``: the server's
    ``--api-key``. ``timeout``: seconds to wait for any answer (None: as long as generation takes).
    ``shutdown()`` closes the HTTP connections; it never stops the server. ``transport``: an httpx
    transport for both clients instead of the network (the unit tests' ``httpx.MockTransport``)."""

    def __init__(self, url: str, api_key: Optional[str] = None, timeout: Optional[float] = None, *,
                 transport: Any = None) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url must be an http:// or https:// URL, got {url!r}.")
        if api_key is not None and not isinstance(api_key, str):
            raise TypeError("api_key must be a string or None.")
        self.url = url.rstrip("/")
        self.api_key = api_key
        self._http = HttpConnection(self.url, api_key, timeout, transport)
        self._server_args: Optional[ServerArgs] = None
        self._processor_names: dict[str, str] = {}  # register_custom_logit_processor's names

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
        """``Engine.generate`` over ``POST /generate``: a dict, a ``BatchResult``, or (``stream=True``)
        an iterator of chunks whose ``close()`` aborts the request on the server."""
        custom_logit_processor = self._processor_named(custom_logit_processor)
        body = generate_body({k: v for k, v in locals().items() if k != "self"})  # the arguments, as given
        if stream:
            return RemoteStream(self._http.send("POST", "/generate", body, stream=True), self.url)
        return result_of(self._http.call("POST", "/generate", body))

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
        """The async twin of ``generate``, on the caller's event loop (``aclose()`` aborts a stream)."""
        custom_logit_processor = self._processor_named(custom_logit_processor)
        body = generate_body({k: v for k, v in locals().items() if k != "self"})
        if stream:
            return AsyncRemoteStream(await self._http.asend("POST", "/generate", body, stream=True), self.url)
        return result_of(await self._http.acall("POST", "/generate", body))

    def encode(self, prompt: Union[str, list[str], list[int], list[list[int]]], image_data: Any = None,
               rid: Union[str, list[str], None] = None, lora_path: Any = None, **unsupported: Any
               ) -> Union[dict, BatchResult]:
        """``Engine.encode`` over ``POST /encode``: ``{"embedding", "meta_info"}`` or a ``BatchResult``."""
        return result_of(self._http.call("POST", "/encode", encode_body_of(prompt, image_data, rid, lora_path, unsupported)))

    async def async_encode(self, prompt: Union[str, list[str], list[int], list[list[int]]], image_data: Any = None,
                           rid: Union[str, list[str], None] = None, lora_path: Any = None, **unsupported: Any
                           ) -> Union[dict, BatchResult]:
        body = encode_body_of(prompt, image_data, rid, lora_path, unsupported)
        return result_of(await self._http.acall("POST", "/encode", body))

    def register_custom_logit_processor(self, name: str, processor: Any) -> None:
        """Make ``custom_logit_processor=name`` refer to a processor class or import path, as the
        Engine's: kept in this client (the name becomes the import path the server loads, so the
        processor's module must be importable on the server too)."""
        if not isinstance(name, str) or not name:
            raise TypeError("register_custom_logit_processor: name must be a non-empty string.")
        self._processor_names[name] = processor if isinstance(processor, str) else processor_json(processor)

    def _processor_named(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self._processor_names.get(v, v) if isinstance(v, str) else v for v in value]
        return self._processor_names.get(value, value) if isinstance(value, str) else value

    # ------------------------------------------------------------------ control
    def update_weights_from_disk(self, model_path: str, load_format: Optional[str] = None,
                                 weight_version: Optional[str] = None) -> tuple[bool, str, int]:
        """``Engine.update_weights_from_disk`` on the server (the path is the server's)."""
        body = {"model_path": model_path, "load_format": load_format, "weight_version": weight_version}
        out = self._http.call("POST", "/update_weights_from_disk", {k: v for k, v in body.items() if v is not None},
                         ok=(200, 400), outcome="success")
        return bool(out["success"]), out.get("message", ""), int(out.get("num_paused_requests", 0))

    def freeze_gc(self) -> None:
        """``gc.freeze()`` in the server's processes (SGLang's ``/freeze_gc``; call after warm-up)."""
        self._http.call("POST", "/freeze_gc", {})

    def abort_request(self, rid: Optional[str] = None, abort_all: bool = False) -> None:
        """Abort by request id (also a batch's ``rid_0``...) or everything; the aborted calls return
        normally with ``finish_reason["type"] == "abort"``."""
        if rid or abort_all:
            self._http.call("POST", "/abort_request", {"rid": rid, "abort_all": bool(abort_all)})

    async def async_abort_request(self, rid: Optional[str] = None, abort_all: bool = False) -> None:
        if rid or abort_all:
            await self._http.acall("POST", "/abort_request", {"rid": rid, "abort_all": bool(abort_all)})

    def flush_cache(self) -> FlushCacheReqOutput:
        out = self._http.call("POST", "/flush_cache", None, ok=(200, 400), outcome="success")
        return FlushCacheReqOutput(bool(out["success"]), out.get("message", ""))

    def open_session(self, capacity_of_str_len: int, session_id: Optional[str] = None, streaming: bool = False,
                     timeout: Optional[float] = None) -> Optional[str]:
        """Open a multi-turn session; returns its id, or None if ``session_id`` is already open."""
        if not isinstance(capacity_of_str_len, int) or isinstance(capacity_of_str_len, bool) \
                or capacity_of_str_len < 0:
            raise ValueError(f"capacity_of_str_len must be a non-negative int, got {capacity_of_str_len!r}.")
        body: dict[str, Any] = {"capacity_of_str_len": capacity_of_str_len, "streaming": bool(streaming)}
        if session_id is not None:
            body["session_id"] = session_id
        if timeout is not None:
            body["timeout"] = timeout
        resp = self._http.send("POST", "/open_session", body)
        if resp.status_code == 400 and session_id is not None and _says_already_open(resp.content):
            return None
        return self._http.answer(resp)

    def close_session(self, session_id: str) -> None:
        """Close a session and release the KV it kept cached (an unknown id is ignored)."""
        self._http.call("POST", "/close_session", {"session_id": session_id})

    def start_profile(self, **kwargs: Any) -> None:
        """``Engine.start_profile`` on the server (``output_dir``/``profile_dir``, ``num_steps``, ...)."""
        self._http.call("POST", "/start_profile", kwargs)

    def stop_profile(self) -> None:
        self._http.call("POST", "/stop_profile", {})

    def get_server_info(self) -> dict[str, Any]:
        return self._http.call("GET", "/get_server_info")

    def get_model_info(self) -> dict[str, Any]:
        return self._http.call("GET", "/get_model_info")

    @property
    def server_args(self) -> ServerArgs:
        """The server's effective ``ServerArgs``, read once from ``/get_server_info``."""
        if self._server_args is None:
            self._server_args = server_args_of(self.get_server_info())
        return self._server_args

    # ------------------------------------------------------------------ LoRA
    def load_lora_adapter(self, lora_name: str, lora_path: str, pinned: bool = False) -> LoRAUpdateOutput:
        """Load an adapter directory on the server (a path that exists here is sent absolute: a server
        on this machine resolves it from its own working directory). Failures are returned."""
        if isinstance(lora_path, str) and os.path.isdir(lora_path):
            lora_path = os.path.abspath(lora_path)
        body = {"lora_name": lora_name, "lora_path": lora_path, "pinned": bool(pinned)}
        return _lora_output(self._http.call("POST", "/load_lora_adapter", body, ok=(200, 400), outcome="success"))

    def unload_lora_adapter(self, lora_name: str) -> LoRAUpdateOutput:
        body = {"lora_name": lora_name}
        return _lora_output(self._http.call("POST", "/unload_lora_adapter", body, ok=(200, 400), outcome="success"))

    async def async_load_lora_adapter(self, lora_name: str, lora_path: str, pinned: bool = False) -> LoRAUpdateOutput:
        return await asyncio.to_thread(self.load_lora_adapter, lora_name, lora_path, pinned)

    async def async_unload_lora_adapter(self, lora_name: str) -> LoRAUpdateOutput:
        return await asyncio.to_thread(self.unload_lora_adapter, lora_name)

    # ------------------------------------------------------------------ lifecycle
    def shutdown(self) -> None:
        """Close the HTTP connections (the server keeps running). Idempotent."""
        self._http.close()

    def __enter__(self) -> "RemoteEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __repr__(self) -> str:
        return f"RemoteEngine({self.url!r})"


def _says_already_open(content: bytes) -> bool:
    """Whether ``/open_session``'s 400 says the id is already open (``Engine.open_session`` returns
    None then, rather than raising)."""
    try:
        body = decode_json(content) if content else None
    except ValueError:  # msgspec's DecodeError is a ValueError
        return False
    err = body.get("error") if isinstance(body, dict) else None
    return isinstance(err, dict) and ("already" in str(err.get("message", "")).lower()
                                      or err.get("code") in ("session_exists", "already_open"))


def _lora_output(out: dict[str, Any]) -> LoRAUpdateOutput:
    return LoRAUpdateOutput(bool(out["success"]), out.get("error_message"), out.get("loaded_adapters"))
