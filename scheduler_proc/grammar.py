"""Grammar-constrained decoding (``json_schema`` / ``regex`` / ``ebnf``) with xgrammar, scheduler side.

Compiling a grammar can take from microseconds (a short regex) to seconds (a large schema), so it
never runs on the scheduler's loop: each distinct ``(kind, text)`` is compiled once in a small
thread pool (xgrammar releases the GIL) and its future is kept in an LRU cache, failures included,
so a repeated bad schema fails at once. A request holds its future and stays out of admission until
it resolves; a compile error or ``COMPILE_TIMEOUT_S`` fails that request alone with a ValueError.

Once compiled, each request owns a ``GrammarMatcher``. Every step the scheduler asks for the token
bitmask of each constrained row that samples and ships it with the plan (int32 words, bit ``i % 32``
of word ``i // 32`` allows token ``i``); the worker masks the logits. The matcher advances with
each accepted token and terminates when it accepts a stop (EOS) token at the grammar's end. A
retracted request keeps its matcher: its outputs are kept too, and the matcher has consumed
exactly them.

JSON schemas compile with compact separators (``any_whitespace=False``): with free whitespace a
small model at temperature can emit newlines and spaces until the length cap, never finishing.

The tokenizer (transformers, for ``TokenizerInfo.from_huggingface``) and xgrammar are loaded on the
first grammar request, in the pool, so engines that never constrain pay nothing at start-up.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Optional

from treadle.runtime.messages import FinishReason
from treadle.runtime.sampling_params import SamplingParams

logger = logging.getLogger("treadle.scheduler")
COMPILE_TIMEOUT_S = 30.0  # a request whose grammar is not compiled by then fails
CACHE_ENTRIES = 512  # distinct compiled grammars kept (valid or not)
COMPILE_THREADS = 2
KINDS = ("json_schema", "regex", "ebnf")
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[14:02:23] /project/cpp/x.cc:83: " on xgrammar errors

Key = tuple[str, str]


@dataclass
class Invalid:
    """A failed compile, cached like a success."""

    message: str


@dataclass
class ReqGrammar:
    """A request's grammar: the compile future until resolved, then its matcher."""

    key: Key
    future: Future
    deadline: float
    matcher: Any = None  # xgrammar.GrammarMatcher

    @property
    def ready(self) -> bool:
        return self.matcher is not None


class GrammarManager:
    def __init__(self, backend: str, tokenizer_dir: Optional[str], vocab_size: int, eos_ids: set[int],
                 trust_remote_code: bool = False) -> None:
        self.backend = backend
        self.tokenizer_dir = tokenizer_dir
        self.vocab_size = vocab_size if 0 < vocab_size < (1 << 31) else None
        self.eos_ids = eos_ids
        self.trust_remote_code = trust_remote_code
        self.cache: OrderedDict[Key, Future] = OrderedDict()
        self.pending: list[Any] = []  # waiting requests whose grammar is compiling
        self._pool: Optional[ThreadPoolExecutor] = None
        self._compiler: Any = None
        self._init_error: Optional[str] = None
        self._init_lock = threading.Lock()
        self._bitmask: Any = None  # int32 CPU tensor [rows, words], grown on demand
        self._vocab = 0  # the grammar vocabulary (the model's lm_head width)

    # ------------------------------------------------------------------ intake
    def key_of(self, sp: SamplingParams) -> Optional[Key]:
        """The request's grammar key, or None; ValueError when grammars are turned off."""
        for kind in KINDS:
            text = getattr(sp, kind)
            if text is not None:
                if self.backend == "none":
                    raise ValueError(f"{kind} needs a grammar backend, but the engine runs with "
                                     f"grammar_backend='none'. Use grammar_backend='xgrammar'.")
                return kind, text
        return None

    def attach(self, req: Any, key: Key) -> None:
        """Start (or reuse) the compile of ``key`` for a request entering the waiting queue."""
        fut = self.cache.get(key)
        if fut is None:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="grammar")
            fut = self._pool.submit(self._compile, key)
            self.cache[key] = fut
            while len(self.cache) > CACHE_ENTRIES:
                self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(key)
        req.grammar = ReqGrammar(key, fut, time.monotonic() + COMPILE_TIMEOUT_S)
        self.pending.append(req)
        self._resolve(req)

    def poll(self) -> list[tuple[Any, str]]:
        """Resolve finished compiles; returns ``(request, message)`` for requests that failed."""
        if not self.pending:
            return []
        failed, still, now = [], [], time.monotonic()
        for req in self.pending:
            if req.finish is not None:  # aborted while compiling
                continue
            err = self._resolve(req)
            if err is not None:
                failed.append((req, err))
            elif not req.grammar.ready:
                if now < req.grammar.deadline:
                    still.append(req)
                else:
                    failed.append((req, f"Grammar compilation timed out after {COMPILE_TIMEOUT_S:g} s "
                                        f"({req.grammar.key[0]})."))
        self.pending = still
        return failed

    def _resolve(self, req: Any) -> Optional[str]:
        """Give ``req`` its matcher if its compile is done; returns the compile error, if any."""
        g = req.grammar
        if g.ready or not g.future.done():
            return None
        result = g.future.result()
        if isinstance(result, Invalid):
            return result.message
        import xgrammar as xgr

        g.matcher = xgr.GrammarMatcher(result)
        return None

    def release(self, req: Any) -> None:
        """An aborted waiting request: forget it, and drop its compile if nobody else needs it
        and it has not started."""
        if req not in self.pending:
            return
        self.pending.remove(req)
        key = req.grammar.key
        if all(r.grammar.key != key for r in self.pending) and req.grammar.future.cancel():
            self.cache.pop(key, None)

    def wait(self, timeout: float) -> None:
        """Sleep until a pending compile finishes (or ``timeout``), instead of spinning."""
        futs = {r.grammar.future for r in self.pending}
        if futs:
            wait(futs, timeout=timeout, return_when=FIRST_COMPLETED)

    # ------------------------------------------------------------------ compile (pool threads)
    def _compile(self, key: Key) -> Any:
        kind, text = key
        compiler = self._get_compiler()
        if compiler is None:
            return Invalid(f"Failed to compile {kind} grammar: {self._init_error}")
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

    def _get_compiler(self) -> Any:
        with self._init_lock:
            if self._compiler is None and self._init_error is None:
                try:
                    self._compiler = self._build_compiler()
                except Exception as e:
                    self._init_error = f"cannot build the tokenizer info for xgrammar: {e}"
                    logger.error(self._init_error)
            return self._compiler

    def _build_compiler(self) -> Any:
        if self.tokenizer_dir is None:
            raise ValueError("no tokenizer directory")
        import xgrammar as xgr
        from transformers import AutoTokenizer

        t0 = time.monotonic()
        tok = AutoTokenizer.from_pretrained(self.tokenizer_dir, trust_remote_code=self.trust_remote_code)
        vocab = self.vocab_size or len(tok)
        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab,
                                                  stop_token_ids=sorted(t for t in self.eos_ids if t < vocab))
        # Our LRU bounds memory; xgrammar's own cache would be unbounded.
        compiler = xgr.GrammarCompiler(info, max_threads=COMPILE_THREADS, cache_enabled=False)
        self._vocab = vocab
        logger.info("xgrammar ready (vocab %d, %s) in %.1f s", vocab, info.vocab_type, time.monotonic() - t0)
        return compiler

    # ------------------------------------------------------------------ per step
    def fill(self, reqs: list[Any]) -> list[bytes]:
        """The next-token bitmask of each request, as raw int32 bytes (b"" where all tokens are allowed)."""
        import xgrammar as xgr

        if self._bitmask is None or self._bitmask.shape[0] < len(reqs):
            self._bitmask = xgr.allocate_token_bitmask(max(len(reqs), 8), self._vocab)
        out = []
        for i, req in enumerate(reqs):
            need = req.grammar.matcher.fill_next_token_bitmask(self._bitmask, i)
            out.append(self._bitmask[i].numpy().tobytes() if need else b"")
        return out

    @staticmethod
    def advance(req: Any, token: int) -> Optional[FinishReason]:
        """Feed an accepted token to the matcher; the finish reason it causes, if any."""
        m = req.grammar.matcher
        if not m.accept_token(token):
            logger.warning("rid=%s: the grammar rejected token %d", req.rid, token)
            return FinishReason(type="abort", message=f"The grammar rejected the sampled token {token}.")
        if m.is_terminated():
            return FinishReason(type="stop", matched=token)
        return None

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
