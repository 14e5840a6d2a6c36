"""Request preparation: a public ``generate``/``encode`` call, checked against how the engine was
started and turned into the ``GenerateReq`` items to send.

``request.py`` normalizes the shape of a call (prompts or ids, rids, ``n``, sampling params); this
module adds what depends on the engine: generation or embedding model, hidden states, custom logit
processors, LoRA adapters, media, the DP group, a session's group. It sends nothing, so a bad call
raises in the caller's thread before any work starts.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

from treadle.client.lora import LoraRegistry
from treadle.client.media import attach_media
from treadle.client.request import normalize_generate, refuse_unbuilt
from treadle.client.request import routed_dp_rank as checked_dp_rank
from treadle.client.sessions import session_params as parse_session_params
from treadle.runtime.logit_processor import load_processor, processor_reference
from treadle.runtime.matryoshka import check_dimensions
from treadle.runtime.messages import GenerateReq
from treadle.runtime.server_args import ServerArgs


class RequestBuilder:
    def __init__(self, server_args: ServerArgs, lora: LoraRegistry,
                 session_group: Callable[[str], Optional[int]], model_config: Optional[dict[str, Any]] = None) -> None:
        self.server_args = server_args
        self.model_config = model_config or {}  # config.json (the text part): what ``dimensions`` is checked against
        self.lora = lora
        self.session_group = session_group  # session id -> the DP group holding its KV (None: unknown)
        self.processors: dict[str, str] = {}  # register_custom_logit_processor: name -> import path
        pref = server_args.preferred_sampling_params  # parsed once, not per call
        self.preferred: Optional[dict[str, Any]] = json.loads(pref) if pref else None

    def generate(
        self, *, prompt: Any, sampling_params: Any, input_ids: Any, image_data: Any, audio_data: Any,
        video_data: Any, return_logprob: Any, logprob_start_len: Any, top_logprobs_num: Any,
        token_ids_logprob: Any, lora_path: Any, custom_logit_processor: Any, return_hidden_states: Any,
        stream: bool, rid: Any, session_params: Any, priority: Any, routed_dp_rank: Any,
        data_parallel_rank: Any, cache_salt: Any, unsupported: dict[str, Any],
    ) -> tuple[list[GenerateReq], bool]:
        """The request items of a ``generate`` call (prompt-major for ``n > 1``) and whether it is a batch."""
        a = self.server_args
        if a.is_embedding:
            raise ValueError("This engine serves an embedding model (is_embedding=True): use encode(), not generate().")
        refuse_unbuilt(unsupported)
        if unsupported:
            raise TypeError(f"generate() got unexpected keyword argument(s): {', '.join(sorted(unsupported))}")
        if audio_data is not None:
            raise ValueError("audio_data: Treadle serves no audio models; images and videos go to a LLaVA model.")
        wants_hidden = any(return_hidden_states) if isinstance(return_hidden_states, list) else return_hidden_states
        if wants_hidden and not a.enable_return_hidden_states:
            raise ValueError("The server is not configured to return hidden states. "
                             "Start the engine with enable_return_hidden_states=True.")
        if cache_salt is not None and not (isinstance(cache_salt, str) or (
                isinstance(cache_salt, list) and all(x is None or isinstance(x, str) for x in cache_salt))):
            raise TypeError("cache_salt must be a str (or, for a batch, a list of str), "
                            f"got {type(cache_salt).__name__}.")
        given = (("return_logprob", return_logprob), ("logprob_start_len", logprob_start_len),
                 ("top_logprobs_num", top_logprobs_num), ("token_ids_logprob", token_ids_logprob),
                 ("return_hidden_states", return_hidden_states), ("priority", priority), ("cache_salt", cache_salt))
        options = {k: v for k, v in given if v is not None}
        if lora_path is not None:
            options["lora_name"] = self.lora.resolve(lora_path)
        if custom_logit_processor is not None:
            options.update(self._resolve_processors(custom_logit_processor))
        reqs, is_batch = normalize_generate(prompt, input_ids, sampling_params, rid, stream, options, self.preferred)
        attach_media(reqs, prompt, input_ids, image_data, video_data)
        dp_rank = checked_dp_rank(routed_dp_rank, data_parallel_rank, a.dp_size)
        if dp_rank is not None:
            for r in reqs:
                r.dp_rank = dp_rank
        if session_params is not None:
            session = parse_session_params(session_params)
            if len(reqs) != 1:
                raise ValueError("session_params needs a single prompt with n=1 (each call is one turn).")
            reqs[0].session = session
            reqs[0].dp_rank = self.session_group(session.id)  # a session's turns run where its KV is
        return reqs, is_batch

    def encode(self, prompt: Any, image_data: Any, rid: Any, lora_path: Any, unsupported: dict[str, Any],
               dimensions: Any = None) -> tuple[list[GenerateReq], bool]:
        """The request items of an ``encode`` call (text or token ids, no output tokens)."""
        if unsupported:
            raise TypeError(f"encode() got unexpected keyword argument(s): {', '.join(sorted(unsupported))}")
        if image_data is not None:
            raise ValueError("image_data: encode() takes text only here; no multimodal embedding model is supported.")
        if not self.server_args.is_embedding:
            raise ValueError("This model does not appear to be an embedding model by default. "
                             "Start the engine with is_embedding=True to use encode().")
        dimensions = check_dimensions(dimensions, self.model_config, self.server_args.model_path)
        ids_input = isinstance(prompt, list) and prompt and (isinstance(prompt[0], int) or isinstance(prompt[0], list))
        lora = self.lora.resolve(lora_path)
        options = {} if lora is None else {"lora_name": lora}
        reqs, is_batch = normalize_generate(None if ids_input else prompt, prompt if ids_input else None,
                                            {"max_new_tokens": 0}, rid, False, options)
        for r in reqs:
            r.embed, r.dimensions = True, dimensions
        return reqs, is_batch

    def register_processor(self, name: str, processor: Any) -> None:
        """``register_custom_logit_processor``: remember the processor's import path under ``name``."""
        if not isinstance(name, str) or not name:
            raise ValueError("name must be a non-empty string.")
        self.processors[name] = processor if isinstance(processor, str) else processor_reference(processor, {})[0]

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
            path, state = processor_reference(proc, self.processors)
            try:
                load_processor(path, state)
            except Exception as e:  # noqa: BLE001 - any import problem is the caller's input error
                raise ValueError(f"custom_logit_processor {path!r} cannot be loaded: {e}") from None
            paths.append(path), states.append(state)
        if not isinstance(procs, list):
            return {"custom_logit_processor": paths[0], "custom_state": states[0]}
        return {"custom_logit_processor": paths, "custom_state": states}
