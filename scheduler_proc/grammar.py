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

Memory: the compile cache is an LRU bounded twice, by ``CACHE_ENTRIES`` grammars and by
``CACHE_BYTES`` of compiled grammars (xgrammar's ``memory_size_bytes``: a small JSON schema takes
about 50 KB on a 49k vocabulary, a large one megabytes), checked whenever a new grammar enters;
xgrammar's own cache stays off (SGLang leaves it unbounded; vLLM bounds it by bytes). A matcher
(a few KB) lives on its request and goes with it, finished, aborted or failed: the manager holds
a request only while its grammar compiles. The first grammar request costs once what
loading xgrammar costs: it imports torch, about 200 MB of the process's RSS (see
``grammar_compiler.py`` for the tokenizer info). Both load in the pool, so engines that never
constrain pay nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Optional

from treadle.runtime.messages import FinishReason
from treadle.runtime.sampling_params import SamplingParams
from treadle.scheduler_proc.grammar_compiler import Invalid, Key, build_compiler, compile_key

logger = logging.getLogger("treadle.scheduler")
COMPILE_TIMEOUT_S = 30.0  # a request whose grammar is not compiled by then fails
CACHE_ENTRIES = 512  # distinct compiled grammars kept (valid or not), least recently used out first
CACHE_BYTES = 128 << 20  # and at most this much of compiled grammars (the newest always stays)
COMPILE_THREADS = 2
KINDS = ("json_schema", "regex", "ebnf")


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
        self._sizes: dict[Key, int] = {}  # bytes of each cached grammar whose compile finished
        self._bytes = 0  # their sum
        self._compiled: deque[tuple[Key, Future]] = deque()  # done, not yet counted
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
            fut.add_done_callback(lambda f, k=key: self._compiled.append((k, f)))  # a pool thread; deque is safe
            self.cache[key] = fut
            self._bound_cache()
        else:
            self.cache.move_to_end(key)
        req.grammar = ReqGrammar(key, fut, time.monotonic() + COMPILE_TIMEOUT_S)
        self.pending.append(req)
        self._resolve(req)

    def _bound_cache(self) -> None:
        """Count the compiles finished since the last call, then drop least recently used grammars
        until the cache holds at most ``CACHE_ENTRIES`` of them and ``CACHE_BYTES``. A request
        holding an evicted grammar keeps it until it ends; a compile still running counts no bytes
        until it finishes, so the bound holds again at the next ``attach`` or ``poll``."""
        while self._compiled:
            key, fut = self._compiled.popleft()
            if self.cache.get(key) is fut and key not in self._sizes:
                self._sizes[key] = _size_of(fut)
                self._bytes += self._sizes[key]
        while len(self.cache) > 1 and (len(self.cache) > CACHE_ENTRIES or self._bytes > CACHE_BYTES):
            key, _ = self.cache.popitem(last=False)
            self._bytes -= self._sizes.pop(key, 0)

    def cached_bytes(self) -> int:
        """The size of the compiled grammars the cache holds (as of the last ``attach`` or ``poll``)."""
        return self._bytes

    def poll(self) -> list[tuple[Any, str]]:
        """Resolve finished compiles; returns ``(request, message)`` for requests that failed."""
        if self._compiled:
            self._bound_cache()
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
            self.cache.pop(key, None)  # never started: no bytes counted

    def wait(self, timeout: float) -> None:
        """Sleep until a pending compile finishes (or ``timeout``), instead of spinning."""
        futs = {r.grammar.future for r in self.pending}
        if futs:
            wait(futs, timeout=timeout, return_when=FIRST_COMPLETED)

    # ------------------------------------------------------------------ compile (pool threads)
    def _compile(self, key: Key) -> Any:
        compiler = self._get_compiler()
        if compiler is None:
            return Invalid(f"Failed to compile {key[0]} grammar: {self._init_error}")
        return compile_key(compiler, key)

    def _get_compiler(self) -> Any:
        with self._init_lock:
            if self._compiler is None and self._init_error is None:
                try:
                    t0 = time.monotonic()
                    self._compiler, self._vocab = build_compiler(self.tokenizer_dir, self.vocab_size, self.eos_ids,
                                                                 self.trust_remote_code, COMPILE_THREADS)
                    logger.info("xgrammar ready (vocab %d) in %.1f s", self._vocab, time.monotonic() - t0)
                except Exception as e:
                    self._init_error = f"cannot build the tokenizer info for xgrammar: {e}"
                    logger.error(self._init_error)
            return self._compiler

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


def _size_of(fut: Future) -> int:
    """Bytes a cached compile holds (0 while it runs or when it failed)."""
    if not fut.done() or fut.cancelled() or fut.exception() is not None:
        return 0
    result = fut.result()
    return 0 if isinstance(result, Invalid) else int(result.memory_size_bytes)
