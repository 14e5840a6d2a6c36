"""FastTokenizer (the ``tokenizers``-only loader) must match transformers' AutoTokenizer exactly."""

from __future__ import annotations

import pytest

from treadle.runtime.tokenizer import FastTokenizer, load_tokenizer

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces",
    "trailing spaces   ",
    "multiple    internal     spaces",
    "tabs\tand\t\ttabs",
    "new\nlines\n\n\nand\r\nCRLF",
    " ",
    "\n",
    "a",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    'import json\nprint(json.dumps({"k": [1, 2, 3]}, indent=2))',
    "Emoji: 😀🎉👍🏽 and flags 🇫🇷",
    "👨‍👩‍👧‍👦",
    "中文测试：你好，世界！",
    "日本語のテキストです。",
    "한국어 문장입니다.",
    "Ünïcödé àccents — em dash … ellipsis «quotes»",
    "Numbers 1234567890 and 3.14159 and -42",
    "<|im_start|>user\nHi<|im_end|>",
    "<|im_start|><|im_end|><|endoftext|>",
    "text<|im_end|>more text",
    "<|im_start|> spaced <|im_end|> ",
    "don't won't I'm you're it's we've",
    "Hello , world . Is it ? Yes !",
    "URL: https://example.com/path?q=1&r=2#frag",
    "\u200b zero width \u00a0 nbsp",
    "Mixed 中文 and English and 😀 together\n\tend",
    "x" * 200,
]


@pytest.fixture(scope="module")
def fast(default_model_dir) -> FastTokenizer:
    return FastTokenizer(default_model_dir)


@pytest.fixture(scope="module")
def chat_text(hf_tokenizer) -> str:
    msgs = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "What is 2+2? 😀 中文"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "  And   code:\n```py\nprint(1)\n```"},
    ]
    return hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def texts(chat_text) -> list[str]:
    return TEXTS + [chat_text]


def test_load_tokenizer_picks_fast(default_model_dir):
    assert isinstance(load_tokenizer(default_model_dir), FastTokenizer)


def test_tokenizer_mode_slow_goes_through_transformers(default_model_dir, fast):
    slow = load_tokenizer(default_model_dir, mode="slow")  # the model has no Python tokenizer: HF's own choice
    assert not isinstance(slow, FastTokenizer)
    for text in TEXTS:
        assert slow.encode(text) == fast.encode(text)


def test_vocab_and_special_ids(fast, hf_tokenizer):
    assert len(fast) == len(hf_tokenizer)
    assert fast.eos_token_id == hf_tokenizer.eos_token_id
    assert fast.eos_token_id is not None
    assert fast.bos_token_id == hf_tokenizer.bos_token_id
    assert fast.eos_token == hf_tokenizer.eos_token


@pytest.mark.parametrize("add_special", [True, False])
def test_encode_matches(fast, hf_tokenizer, texts, add_special):
    for t in texts:
        assert fast.encode(t, add_special_tokens=add_special) == \
            hf_tokenizer.encode(t, add_special_tokens=add_special), repr(t)


def test_chat_template_special_tokens_are_single_ids(fast, hf_tokenizer, chat_text):
    ids = fast.encode(chat_text, add_special_tokens=False)
    start = hf_tokenizer.convert_tokens_to_ids("<|im_start|>")
    end = hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ids.count(start) == chat_text.count("<|im_start|>")
    assert ids.count(end) == chat_text.count("<|im_end|>")
    assert fast.convert_ids_to_tokens(ids) == hf_tokenizer.convert_ids_to_tokens(ids)


@pytest.mark.parametrize("add_special", [True, False])
def test_encode_batch_matches(fast, hf_tokenizer, texts, add_special):
    got = fast.encode_batch(texts, add_special_tokens=add_special)
    assert got == hf_tokenizer(texts, add_special_tokens=add_special)["input_ids"]
    assert got == [fast.encode(t, add_special_tokens=add_special) for t in texts]


@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches(fast, hf_tokenizer, texts, skip):
    for t in texts:
        ids = hf_tokenizer.encode(t, add_special_tokens=False)
        assert fast.decode(ids, skip_special_tokens=skip) == \
            hf_tokenizer.decode(ids, skip_special_tokens=skip), repr(t)


@pytest.mark.parametrize("skip", [True, False])
def test_decode_partial_and_odd_sequences(fast, hf_tokenizer, texts, skip):
    """Prefixes (half an emoji / CJK char), single ids and the empty list decode the same too."""
    seqs = [[]]
    for t in texts[:25]:
        ids = hf_tokenizer.encode(t, add_special_tokens=False)
        seqs += [ids[:k] for k in range(1, len(ids), max(1, len(ids) // 4))]
    seqs += [[i] for i in range(0, len(fast), 997)]
    seqs.append(list(range(len(fast) - 20, len(fast))))  # the added tokens at the end of the vocab
    for ids in seqs:
        assert fast.decode(ids, skip_special_tokens=skip) == \
            hf_tokenizer.decode(ids, skip_special_tokens=skip), ids


def test_decode_accepts_iterables(fast, hf_tokenizer):
    ids = hf_tokenizer.encode("Hello there", add_special_tokens=False)
    assert fast.decode(tuple(ids)) == fast.decode(iter(ids)) == hf_tokenizer.decode(ids)
