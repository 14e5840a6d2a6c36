"""The grammar manager (scheduler_proc/grammar.py) on the default model's tokenizer, the worker's
bitmask application, and the scheduler hooks (admission while compiling, masks, finish, retraction)."""

from __future__ import annotations

import gc
import json
import re
import threading
import time
import weakref
from types import SimpleNamespace

import pytest
import torch

from treadle.gpu_worker.logits_processing import apply_token_bitmasks
from treadle.runtime.messages import TokenizedReq, WorkerInfo
from treadle.runtime.sampling_params import SamplingParams
from treadle.runtime.server_args import ServerArgs
from treadle.scheduler_proc import grammar as gmod
from treadle.scheduler_proc.grammar import GrammarManager
from treadle.scheduler_proc.scheduler import Scheduler

EOS = 2  # SmolLM2's <|im_end|>
VOCAB = 49152
PHONE = r"\d{3}-\d{3}-\d{4}"


@pytest.fixture(scope="module")
def model_dir() -> str:
    from treadle.runtime.model_files import resolve_model_files

    return resolve_model_files("default").model_dir


@pytest.fixture(scope="module")
def shared(model_dir) -> GrammarManager:
    """One manager that has built xgrammar's tokenizer info (a few seconds); ``fresh`` reuses it."""
    m = GrammarManager("xgrammar", model_dir, VOCAB, {EOS})
    assert m._get_compiler() is not None
    yield m
    m.shutdown()


@pytest.fixture
def fresh(shared, model_dir):
    """A manager with an empty cache and pool, sharing the compiler of ``shared``."""
    made = []

    def make() -> GrammarManager:
        m = GrammarManager("xgrammar", model_dir, VOCAB, {EOS})
        m._compiler, m._vocab = shared._compiler, shared._vocab
        made.append(m)
        return m

    yield make
    for m in made:
        m.shutdown()


def fake_req(rid: str = "r") -> SimpleNamespace:
    return SimpleNamespace(rid=rid, finish=None, grammar=None)


def settle(m: GrammarManager, timeout: float = 20.0) -> list:
    """Poll until no request is compiling; returns the failures."""
    failed, end = [], time.monotonic() + timeout
    while m.pending and time.monotonic() < end:
        m.wait(0.05)
        failed += m.poll()
    assert not m.pending
    return failed


def allowed_ids(mask: bytes) -> list[int]:
    words = torch.frombuffer(bytearray(mask), dtype=torch.int32)
    bits = (words[:, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return torch.nonzero(bits.flatten()).flatten().tolist()


# ------------------------------------------------------------------ manager
def test_compile_once_per_key(fresh):
    m = fresh()
    calls = []
    real = m._compile
    m._compile = lambda key: calls.append(key) or real(key)
    a, b, c = fake_req("a"), fake_req("b"), fake_req("c")
    m.attach(a, ("regex", PHONE))
    m.attach(b, ("regex", PHONE))
    m.attach(c, ("regex", "[ab]+"))
    assert a.grammar.future is b.grammar.future
    assert settle(m) == []
    assert calls == [("regex", PHONE), ("regex", "[ab]+")]
    assert a.grammar.ready and b.grammar.ready and a.grammar.matcher is not b.grammar.matcher
    d = fake_req("d")
    m.attach(d, ("regex", PHONE))  # a cache hit resolves at once
    assert d.grammar.ready and calls == [("regex", PHONE), ("regex", "[ab]+")]


@pytest.mark.parametrize("key, fragment", [
    (("regex", "(ab"), "Regex parsing error"),
    (("ebnf", "root ::= foo"), 'Rule "foo" is not defined'),
    (("json_schema", "{not json"), "Failed to parse JSON"),
])
def test_invalid_grammar_fails_with_compiler_message_and_is_cached(fresh, key, fragment):
    m = fresh()
    r = fake_req()
    m.attach(r, key)
    (req, msg), = settle(m)
    assert req is r and fragment in msg and msg.startswith(f"Failed to compile {key[0]} grammar: ")
    assert "/project/" not in msg  # xgrammar's C++ source location is stripped
    again = fake_req("again")
    m.attach(again, key)
    assert again.grammar.future is r.grammar.future
    assert m.poll() == [(again, msg)]  # the cached failure needs no compile


def test_compile_timeout_fails_only_that_request(fresh, monkeypatch):
    m = fresh()
    release = threading.Event()
    real = m._compile
    m._compile = lambda key: (release.wait(10) if key[1] == "slow" else True) and real(key)
    monkeypatch.setattr(gmod, "COMPILE_TIMEOUT_S", 0.3)
    slow, fast = fake_req("slow"), fake_req("fast")
    m.attach(slow, ("regex", "slow"))
    m.attach(fast, ("regex", "[0-9]+"))
    try:
        (req, msg), = settle(m, timeout=5)
        assert req is slow and "timed out after 0.3 s" in msg
        assert fast.grammar.ready
    finally:
        release.set()


def test_release_cancels_a_queued_compile(fresh, monkeypatch):
    m = fresh()
    gate = threading.Event()
    real = m._compile
    m._compile = lambda key: gate.wait(10) and real(key)
    busy = [fake_req(f"b{i}") for i in range(gmod.COMPILE_THREADS)]
    for i, r in enumerate(busy):
        m.attach(r, ("regex", f"x{i}"))
    queued = fake_req("q")
    m.attach(queued, ("regex", "queued"))
    m.release(queued)
    assert queued.grammar.future.cancelled() and ("regex", "queued") not in m.cache
    gate.set()
    assert settle(m) == []


def test_cache_is_an_lru_bounded_by_entries(fresh, monkeypatch):
    monkeypatch.setattr(gmod, "CACHE_ENTRIES", 3)
    m = fresh()
    keys = [("regex", f"[0-9]{{{i}}}") for i in range(1, 6)]
    for key in keys[:3]:
        m.attach(fake_req(), key)
    settle(m)
    m.attach(fake_req(), keys[0])  # a hit makes keys[0] the most recently used
    for key in keys[3:]:
        m.attach(fake_req(), key)
    settle(m)
    assert list(m.cache) == [keys[0], keys[3], keys[4]]


def test_cache_is_bounded_by_compiled_bytes(fresh, monkeypatch):
    """Each compiled grammar counts its xgrammar size; past ``CACHE_BYTES`` the least recently used
    go, but never the newest, and a request keeps the grammar it holds."""
    m = fresh()
    schemas = [json.dumps({"type": "object", "properties": {f"f{i}": {"type": "string"}}, "required": [f"f{i}"]})
               for i in range(6)]
    first = fake_req()
    m.attach(first, ("json_schema", schemas[0]))
    settle(m)
    one = m.cached_bytes()
    assert one > 1000
    monkeypatch.setattr(gmod, "CACHE_BYTES", int(2.5 * one))
    for text in schemas[1:]:
        m.attach(fake_req(), ("json_schema", text))
        settle(m)
        assert m.cached_bytes() <= 2.5 * one
    assert list(m.cache) == [("json_schema", t) for t in schemas[-2:]]
    assert first.grammar.ready and m.fill([first])[0]  # evicted from the cache, still the request's
    monkeypatch.setattr(gmod, "CACHE_BYTES", 1)
    m.attach(fake_req(), ("json_schema", schemas[0]))
    settle(m)
    assert list(m.cache) == [("json_schema", schemas[0])]  # alone over the bound: the newest stays


def test_tokenizer_info_from_tokenizer_json_is_transformers_one(model_dir):
    """The tokenizer info read with ``tokenizers`` is the one ``from_huggingface`` builds (same
    serialization: vocabulary, encoding, prefix space, stop and special ids)."""
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from treadle.scheduler_proc.grammar_compiler import tokenizer_info_from_json

    ours = tokenizer_info_from_json(model_dir, VOCAB, {EOS})
    theirs = xgr.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(model_dir), vocab_size=VOCAB,
                                                stop_token_ids=[EOS])
    assert ours.serialize_json() == theirs.serialize_json()


def test_backend_none_refuses_grammars():
    m = GrammarManager("none", None, VOCAB, {EOS})
    assert m.key_of(SamplingParams()) is None
    with pytest.raises(ValueError, match="grammar_backend='none'"):
        m.key_of(SamplingParams(regex="a"))


def test_fill_accept_terminate(fresh, shared):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared.tokenizer_dir)
    m = fresh()
    r = fake_req()
    m.attach(r, ("ebnf", 'root ::= "yes" | "no"'))
    assert settle(m) == []
    mask, = m.fill([r])
    assert len(mask) == VOCAB // 8
    first = allowed_ids(mask)
    assert first and all(("yes".startswith(t) or "no".startswith(t)) and t for t in tok.batch_decode([[i] for i in first]))
    assert EOS not in first
    for t in tok.encode("yes", add_special_tokens=False):
        assert m.advance(r, t) is None
    assert allowed_ids(m.fill([r])[0]) == [EOS]  # complete: only the stop token remains
    fin = m.advance(r, EOS)
    assert fin.type == "stop" and fin.matched == EOS


def test_rejected_token_aborts(fresh):
    m = fresh()
    r = fake_req()
    m.attach(r, ("regex", "[0-9]+"))
    settle(m)
    assert m.advance(r, EOS).type == "abort"  # EOS before any digit


# ------------------------------------------------------------------ worker side
def test_apply_token_bitmasks_matches_bits_and_masks_padding():
    torch.manual_seed(0)
    vocab, padded, n = 100, 130, 4
    words = (vocab + 31) // 32
    allowed = torch.rand(n, words * 32) < 0.3
    allowed[:, vocab:] = True  # set bits up to the bitmask's width count; logits past it are masked
    packed = torch.zeros(n, words, dtype=torch.int64)
    for b in range(32):
        packed |= allowed[:, b::32].long() << b
    packed = ((packed + 2**31) % 2**32 - 2**31).to(torch.int32)
    logits = torch.randn(n, padded)
    out = logits.clone()
    apply_token_bitmasks(out, [(1, packed[1].numpy().tobytes()), (3, packed[3].numpy().tobytes())])
    for row in (0, 2):
        assert torch.equal(out[row], logits[row])
    for row in (1, 3):
        keep = torch.zeros(padded, dtype=torch.bool)
        keep[: words * 32] = allowed[row]
        assert torch.equal(out[row], logits[row].masked_fill(~keep, float("-inf")))


# ------------------------------------------------------------------ scheduler hooks
def make_sched(model_dir, **kw) -> Scheduler:
    args = ServerArgs(device="cpu", random_seed=0, page_size=4, disable_radix_cache=True, **kw).resolved()
    tok = SimpleNamespace(decode=lambda ids, **_: "")
    return Scheduler(args, tok, {EOS}, WorkerInfo(context_len=256, kv_tokens=1024, max_slots=4, vocab_size=VOCAB),
                     tokenizer_dir=model_dir)


def treq(rid: str, **sampling) -> TokenizedReq:
    return TokenizedReq(rid=rid, input_ids=[5, 6, 7, 8], sampling=SamplingParams(**sampling))


def test_scheduler_constrained_beside_unconstrained(model_dir, shared):
    """The constrained request waits for its compile without holding up the other; its rows carry
    masks, a retraction keeps its matcher, and the grammar ends it with the stop token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    s = make_sched(model_dir)
    s.grammars._compiler, s.grammars._vocab = shared._compiler, shared._vocab
    gate = threading.Event()
    real = s.grammars._compile
    s.grammars._compile = lambda key: gate.wait(10) and real(key)
    assert s.add_requests([treq("c", regex=PHONE, max_new_tokens=30), treq("u", max_new_tokens=3)]) == []
    plan = s.schedule()
    assert [b.req.rid for b in s.plan_rows] == ["u"] and plan.rows[0].token_bitmask == b""
    s.apply_result([9])
    gate.set()
    s.grammars.wait(10)
    out, retracted = [], False
    while not s.is_idle():
        plan = s.schedule()
        picks = []
        for row, booked in zip(plan.rows, s.plan_rows):
            if not booked.samples:
                continue
            if booked.req.rid == "c":
                assert row.token_bitmask
                picks.append(allowed_ids(row.token_bitmask)[-1])  # the highest id: often a multi-char token
            else:
                assert row.token_bitmask == b""
                picks.append(9)
        s.apply_result(picks)
        c = next((r for r in s.running if r.rid == "c"), None)
        if c is not None and len(c.output_ids) == 2 and not retracted:
            s.retraction.retract(c)
            retracted = True
    s.check_integrity()
    outs = [o for o in s.take_outputs() if o.rid == "c"]
    ids = [t for o in outs for t in o.new_ids]
    assert retracted and outs[-1].finish.type == "stop" and outs[-1].finish.matched == EOS and ids[-1] == EOS
    assert re.fullmatch(PHONE, tok.decode(ids[:-1]))


def test_scheduler_backend_none_rejects(model_dir):
    s = make_sched(model_dir, grammar_backend="none")
    (rid, kind, msg), = s.add_requests([treq("x", json_schema="{}")])
    assert (rid, kind) == ("x", "value") and "grammar_backend" in msg
    assert s.add_requests([treq("y")]) == [] and len(s.waiting) == 1


def test_scheduler_compile_error_reported_once(model_dir, shared):
    s = make_sched(model_dir)
    s.grammars._compiler, s.grammars._vocab = shared._compiler, shared._vocab
    s.add_requests([treq("bad", regex="(ab")])
    s.grammars.wait(10)
    assert s.schedule() is None and s.is_idle()
    (rid, kind, msg), = s.take_errors()
    assert rid == "bad" and kind == "value" and msg.startswith("Failed to compile regex grammar")
    assert s.take_errors() == []


def test_scheduler_frees_matchers_with_their_requests(model_dir, shared):
    """Finished (by the grammar or by length), failed, and aborted (compiling, waiting, running)
    requests leave nothing behind: once the scheduler is idle no request, grammar or matcher of
    theirs is alive. A retracted request keeps its matcher until it ends."""
    s = make_sched(model_dir)
    s.grammars._compiler, s.grammars._vocab = shared._compiler, shared._vocab
    gate = threading.Event()
    real = s.grammars._compile
    s.grammars._compile = lambda key: (gate.wait(10) if key[1] == "gated" else True) and real(key)
    s.add_requests([treq("fin", regex="[0-9]", max_new_tokens=5), treq("len", regex="[0-9]+", max_new_tokens=2),
                    treq("run", regex="[a-z]+", max_new_tokens=50), treq("bad", regex="(ab"),
                    treq("compiling", regex="gated"), treq("waiting", regex="[0-9]+", max_new_tokens=50)])
    refs = {r.rid: weakref.ref(r) for r in s.waiting}
    while not all(r.grammar.ready for r in s.waiting if r.rid not in ("bad", "compiling")):
        s.grammars.wait(0.1)
        [s.grammars._resolve(r) for r in s.waiting]  # (a comprehension keeps no request in this frame)
    grammars = {r.rid: weakref.ref(r.grammar) for r in s.waiting}
    matchers = {r.rid: weakref.ref(r.grammar.matcher) for r in s.waiting if r.grammar.ready}
    s.abort("compiling", False)
    s.abort("waiting", False)
    steps, retracted = 0, False
    while not s.is_idle():
        plan = s.schedule()
        if plan is None:
            s.grammars.wait(0.1)
            continue
        picks = [allowed_ids(row.token_bitmask)[-1] if row.token_bitmask else 9
                 for row, b in zip(plan.rows, s.plan_rows) if b.samples]
        s.apply_result(picks)
        steps += 1
        run = next((r for r in s.running if r.rid == "run"), None)
        if steps == 2 and run is not None:
            s.retraction.retract(run)
            retracted = run.grammar.matcher is not None  # its outputs are kept, and so is its matcher
        elif steps == 5:
            s.abort("run", False)
        del run
    assert retracted
    gate.set()
    s.schedule()  # the loop plans again at idle: the last plan's rows are let go
    finish = {o.rid: o.finish.type for o in s.take_outputs() if o.finish is not None}
    assert finish == {"fin": "stop", "len": "length", "run": "abort", "compiling": "abort", "waiting": "abort"}
    assert [e[0] for e in s.take_errors()] == ["bad"]
    gc.collect()
    alive = [(what, rid) for what, table in (("request", refs), ("grammar", grammars), ("matcher", matchers))
             for rid, ref in table.items() if ref() is not None]
    assert alive == []
    s.check_integrity()
    s.grammars.shutdown()
