"""A light tokenizer for the tokenizer, scheduler and detokenizer processes.

Loading transformers' ``AutoTokenizer`` costs about 4 s per process (it imports torch); the
``tokenizers`` library reads the same ``tokenizer.json`` in 0.2 s and encodes and decodes
identically (checked in tests/unit/test_tokenizer.py). Directories without a
``tokenizer.json`` fall back to ``AutoTokenizer``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable


class FastTokenizer:
    """The subset of the HF tokenizer API that the engine's processes use."""

    def __init__(self, tokenizer_dir: str) -> None:
        import tokenizers

        self._tok = tokenizers.Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
        self._tok.no_padding()  # some tokenizer.json files pad/truncate (all-MiniLM pads to 128); HF does not
        self._tok.no_truncation()
        cfg_path = os.path.join(tokenizer_dir, "tokenizer_config.json")
        cfg: dict[str, Any] = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}
        self.clean_up_spaces = bool(cfg.get("clean_up_tokenization_spaces", False))
        self.eos_token = _content(cfg.get("eos_token"))
        self.bos_token = _content(cfg.get("bos_token"))
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False, **_: Any) -> str:
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up(text) if self.clean_up_spaces else text

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self._tok.id_to_token(i) for i in ids]

    def add_special_token(self, token: str) -> int:
        """``token``'s id, added as a special token first if the vocabulary lacks it."""
        if self._tok.token_to_id(token) is None:
            self._tok.add_special_tokens([token])
        return self._tok.token_to_id(token)


class _HFTokenizer:
    """Adapter giving an ``AutoTokenizer`` the same ``encode_batch`` as ``FastTokenizer``."""

    def __init__(self, tok: Any) -> None:
        self._t = tok
        self.eos_token_id = tok.eos_token_id
        self.bos_token_id = tok.bos_token_id

    def __len__(self) -> int:
        return len(self._t)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._t.encode(text, add_special_tokens=add_special_tokens)

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return self._t(texts, add_special_tokens=add_special_tokens)["input_ids"]

    def add_special_token(self, token: str) -> int:
        """``token``'s id, added as a special token first if the vocabulary lacks it."""
        if token not in self._t.get_vocab():
            self._t.add_tokens([token], special_tokens=True)
        return self._t.convert_tokens_to_ids(token)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False, **kw: Any) -> str:
        try:
            return self._t.decode(list(ids), skip_special_tokens=skip_special_tokens, **kw)
        except TypeError:
            return self._t.decode(list(ids), skip_special_tokens=skip_special_tokens)


def load_tokenizer_of(files: Any, args: Any) -> Any:
    """The served model's tokenizer for a child process, or None when the engine was started with
    ``skip_tokenizer_init`` (token ids in and out: the model may ship no tokenizer files)."""
    if args.skip_tokenizer_init:
        return None
    return load_tokenizer(files.tokenizer_dir, args.trust_remote_code, args.tokenizer_mode)


def load_tokenizer(tokenizer_dir: str, trust_remote_code: bool = False, mode: str = "auto") -> Any:
    """The Rust tokenizer straight from ``tokenizer.json`` where there is one; else, with remote
    code, or with ``mode="slow"`` (``tokenizer_mode``: the Python tokenizer, ``use_fast=False``,
    where the model ships one), transformers' ``AutoTokenizer``."""
    if os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")) and not trust_remote_code and mode != "slow":
        return FastTokenizer(tokenizer_dir)
    from transformers import AutoTokenizer

    return _HFTokenizer(AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code,
                                                      use_fast=mode != "slow"))


def _content(tok: Any) -> Any:
    return tok.get("content") if isinstance(tok, dict) else tok


def _clean_up(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (only used when the tokenizer config asks for it)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text
