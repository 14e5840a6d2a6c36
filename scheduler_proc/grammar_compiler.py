"""xgrammar's compiler for the model's tokenizer, and compiling one grammar with it (the grammar
manager's pool threads call these; ``grammar.py`` keeps the cache and the matchers).

The tokenizer info is read from ``tokenizer.json`` with the ``tokenizers`` library where there is
one: transformers' ``AutoTokenizer.from_pretrained`` imports some 700 more modules, about 100 MB
of the scheduler's RSS and seconds of the first grammar request, to give xgrammar the same
vocabulary. Directories without a ``tokenizer.json``, remote-code tokenizers, and vocabularies
whose own encoding disagrees with the serialized one still go through transformers.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Optional

_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[14:02:23] /project/cpp/x.cc:83: " on xgrammar errors

Key = tuple[str, str]  # (kind, text): ("json_schema", "{...}"), ("regex", ...), ("ebnf", ...)


@dataclass
class Invalid:
    """A failed compile, cached like a success."""

    message: str


def compile_key(compiler: Any, key: Key) -> Any:
    """The ``CompiledGrammar`` of ``key``, or ``Invalid`` with the parser's message."""
    kind, text = key
    try:
        if kind == "json_schema":
            if text == "$$ANY$$":
                return compiler.compile_builtin_json_grammar()
            return compiler.compile_json_schema(text, any_whitespace=False)
        if kind == "regex":
            return compiler.compile_regex(text)
        return compiler.compile_grammar(text)
    except Exception as e:  # xgrammar raises RuntimeError (sometimes ValueError) with the parser's message
        msg = _CPP_PREFIX.sub("", str(e).strip())
        return Invalid(f"Failed to compile {kind} grammar: {msg}")


def build_compiler(tokenizer_dir: Optional[str], vocab_size: Optional[int], eos_ids: set[int],
                   trust_remote_code: bool, threads: int) -> tuple[Any, int]:
    """``(GrammarCompiler, vocabulary size of its bitmasks)``; raises when no tokenizer info can be built."""
    if tokenizer_dir is None:
        raise ValueError("no tokenizer directory")
    import xgrammar as xgr

    info = None if trust_remote_code else tokenizer_info_from_json(tokenizer_dir, vocab_size, eos_ids)
    if info is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code)
        vocab = vocab_size or len(tok)
        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=_stops(eos_ids, vocab))
    # The manager's LRU bounds memory; xgrammar's own cache would be a second, unbounded one.
    return xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False), info.vocab_size


def tokenizer_info_from_json(tokenizer_dir: str, vocab_size: Optional[int], eos_ids: set[int]) -> Any:
    """xgrammar's ``TokenizerInfo`` as ``TokenizerInfo.from_huggingface`` builds it for a fast
    tokenizer (the vocabulary by id; its encoding and prefix space detected from the serialized
    tokenizer), read straight from ``tokenizer.json``. None where that does not apply: no
    ``tokenizer.json``, an xgrammar without these helpers, or a vocabulary whose own encoding
    disagrees with the serialized one (xgrammar then probes the tokenizer itself)."""
    path = os.path.join(tokenizer_dir, "tokenizer.json")
    if not os.path.exists(path):
        return None
    import tokenizers
    import xgrammar as xgr

    tok = tokenizers.Tokenizer.from_file(path)
    vocab_dict = tok.get_vocab(with_added_tokens=True)
    size = vocab_size or max(len(vocab_dict), max(vocab_dict.values()) + 1)
    try:
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(tok.to_str())
        detect_from_vocab = getattr(xgr.TokenizerInfo, "_detect_vocab_type_from_vocab", None)
    except AttributeError:
        return None
    if detect_from_vocab is not None and detect_from_vocab(vocab_dict) not in (None, meta["vocab_type"]):
        return None
    encoded = [""] * size
    for token, idx in vocab_dict.items():
        if idx < size:
            encoded[idx] = token
    return xgr.TokenizerInfo(encoded, vocab_type=meta["vocab_type"], vocab_size=size,
                             stop_token_ids=_stops(eos_ids, size), add_prefix_space=meta["add_prefix_space"])


def _stops(eos_ids: set[int], vocab: int) -> Optional[list[int]]:
    """The stop ids inside the vocabulary (None: none known, xgrammar detects them)."""
    return sorted(t for t in eos_ids if t < vocab) or None
