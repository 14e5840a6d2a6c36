"""``engine.tokenizer_manager``: the attributes of SGLang's ``TokenizerManager`` that frameworks
read off an ``Engine``.

SGLang's tokenizer manager lives in the user's process, and clients reach into it: lm-eval's SGLang
backend reads ``engine.tokenizer_manager.tokenizer`` (to count and cut prompts) and
``.context_len``; RL frameworks read the tokenizer and the server args. Treadle tokenizes in a child
process, so this object only answers those reads: the Hugging Face tokenizer is loaded here on first
use (a few seconds: transformers imports torch), the context length is the engine's resolved one.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from treadle.runtime.server_args import ServerArgs


class TokenizerManager:
    """``tokenizer`` (transformers' tokenizer of the served model, or None with
    ``skip_tokenizer_init``), ``context_len``, ``server_args``, ``model_path``, ``is_generation``."""

    def __init__(self, server_args: ServerArgs, tokenizer_dir: str, server_info: Callable[[], dict[str, Any]]) -> None:
        self.server_args = server_args
        self.model_path = server_args.model_path
        self.is_generation = not server_args.is_embedding
        self._tokenizer_dir = tokenizer_dir
        self._server_info = server_info

    @functools.cached_property
    def tokenizer(self) -> Any:
        if self.server_args.skip_tokenizer_init:
            return None  # as SGLang's: an engine started without a tokenizer has none to give
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self._tokenizer_dir, trust_remote_code=self.server_args.trust_remote_code,
                                             use_fast=self.server_args.tokenizer_mode != "slow")

    @functools.cached_property
    def context_len(self) -> int:
        """The longest sequence (prompt + output) a request may have."""
        return int(self._server_info()["context_length"])
