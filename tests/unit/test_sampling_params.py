"""``SamplingParams.verify``: every range of API.md section 4.1 raises ValueError naming the field."""

from __future__ import annotations

import math

import msgspec
import pytest

from treadle.runtime.sampling_params import MAX_N, SamplingParams

VOCAB = 100
INF, NAN = math.inf, math.nan

INVALID = [
    # temperature: finite, >= 0
    ("temperature", -0.1), ("temperature", -1), ("temperature", NAN), ("temperature", INF), ("temperature", -INF),
    ("temperature", "0.5"), ("temperature", None), ("temperature", True), ("temperature", [1.0]),
    # top_p: (0, 1]
    ("top_p", 0.0), ("top_p", 0), ("top_p", -0.5), ("top_p", 1.0001), ("top_p", 2), ("top_p", NAN), ("top_p", INF),
    ("top_p", "1"),
    # top_k: -1 or >= 1
    ("top_k", 0), ("top_k", -2), ("top_k", -100), ("top_k", 1.5), ("top_k", "5"), ("top_k", True),
    # min_p: [0, 1]
    ("min_p", -0.01), ("min_p", 1.01), ("min_p", NAN), ("min_p", "0.1"),
    # penalties: [-2, 2]
    ("frequency_penalty", -2.01), ("frequency_penalty", 2.01), ("frequency_penalty", NAN),
    ("frequency_penalty", INF), ("frequency_penalty", "1"),
    ("presence_penalty", -2.5), ("presence_penalty", 3), ("presence_penalty", NAN), ("presence_penalty", None),
    # repetition_penalty: (0, 2]
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", 2.01),
    ("repetition_penalty", NAN), ("repetition_penalty", INF), ("repetition_penalty", "1"),
    # max_new_tokens: int >= 0 or None
    ("max_new_tokens", -1), ("max_new_tokens", 1.5), ("max_new_tokens", "10"), ("max_new_tokens", True),
    # min_new_tokens: int >= 0 (and <= max_new_tokens, below)
    ("min_new_tokens", -1), ("min_new_tokens", 1.0), ("min_new_tokens", None),
    # n: 1 .. MAX_N
    ("n", 0), ("n", -1), ("n", MAX_N + 1), ("n", 2.0), ("n", "2"),
    # bool flags
    ("ignore_eos", 1), ("ignore_eos", "yes"), ("skip_special_tokens", None), ("spaces_between_special_tokens", 0),
    ("no_stop_trim", "false"),
    # stop strings
    ("stop", ""), ("stop", [""]), ("stop", ["ok", ""]), ("stop", [1]), ("stop", ["a", None]),
    # stream_interval, sampling_seed
    ("stream_interval", 0), ("stream_interval", -1), ("stream_interval", 1.5),
    ("sampling_seed", 1.5), ("sampling_seed", "7"),
    # stop_token_ids (vocab 100)
    ("stop_token_ids", [-1]), ("stop_token_ids", ["3"]),
    ("stop_token_ids", [1.0]), ("stop_token_ids", 5), ("stop_token_ids", "5"),
    # logit_bias: keys token ids in [0, vocab), values finite numbers
    ("logit_bias", {"abc": 1.0}), ("logit_bias", {"-1": 1.0}), ("logit_bias", {str(VOCAB): 1.0}),
    ("logit_bias", {"1.5": 1.0}), ("logit_bias", {"": 1.0}), ("logit_bias", {"1": "x"}), ("logit_bias", {"1": NAN}),
    ("logit_bias", [1, 2]),
    # grammars: strings
    ("json_schema", {"type": "object"}), ("regex", 5), ("ebnf", ["root ::= x"]),
]


@pytest.mark.parametrize("field,value", INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_value_names_field(field, value):
    sp = SamplingParams(**{field: value})
    with pytest.raises(ValueError, match=field):
        sp.verify(vocab_size=VOCAB)


def test_min_new_tokens_above_max():
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingParams(max_new_tokens=5, min_new_tokens=6).verify()
    SamplingParams(max_new_tokens=5, min_new_tokens=5).verify()
    SamplingParams(max_new_tokens=None, min_new_tokens=10_000).verify()


@pytest.mark.parametrize("grammars", [
    {"json_schema": "{}", "regex": "a+"}, {"regex": "a+", "ebnf": "root ::= 'a'"},
    {"json_schema": "{}", "ebnf": "root ::= 'a'"}, {"json_schema": "{}", "regex": "a", "ebnf": "r ::= 'a'"},
])
def test_two_grammars(grammars):
    with pytest.raises(ValueError, match="Only one of regex, json_schema, or ebnf"):
        SamplingParams(**grammars).verify()


def test_structural_tag_not_counted_as_grammar():
    SamplingParams(structural_tag="{}", regex="a+").verify()


def test_vocab_checks_only_with_vocab_size():
    SamplingParams(stop_token_ids=[10**9], logit_bias={str(10**9): 1.0}).verify()
    # ids beyond the vocabulary never match, so they are allowed (the usage guide passes Llama-3's)
    SamplingParams(stop_token_ids=[10**9]).verify(vocab_size=VOCAB)


VALID = [
    {},
    {"temperature": 0.0}, {"temperature": 0}, {"temperature": 1e-7}, {"temperature": 100.0},
    {"top_p": 1.0}, {"top_p": 1}, {"top_p": 1e-9},
    {"top_k": -1}, {"top_k": 1}, {"top_k": 10**9},
    {"min_p": 0.0}, {"min_p": 1.0},
    {"frequency_penalty": -2.0}, {"frequency_penalty": 2.0}, {"presence_penalty": -2}, {"presence_penalty": 2},
    {"repetition_penalty": 2.0}, {"repetition_penalty": 1e-6},
    {"max_new_tokens": 0}, {"max_new_tokens": None}, {"max_new_tokens": 10**6},
    {"min_new_tokens": 0}, {"min_new_tokens": 128},
    {"n": 1}, {"n": MAX_N},
    {"stop": "x"}, {"stop": ["x", "yz"]}, {"stop": []}, {"stop": None},
    {"stop_token_ids": []}, {"stop_token_ids": [0, VOCAB - 1]}, {"stop_token_ids": (1, 2)}, {"stop_token_ids": {3}},
    {"logit_bias": {}}, {"logit_bias": {"0": -100.0, str(VOCAB - 1): 5}}, {"logit_bias": {"7": 0}},
    {"json_schema": '{"type": "object"}'}, {"regex": "[a-z]+"}, {"ebnf": "root ::= 'a'"},
    {"stream_interval": 1}, {"stream_interval": None}, {"sampling_seed": 0}, {"sampling_seed": -5},
    {"ignore_eos": True, "skip_special_tokens": False, "spaces_between_special_tokens": False, "no_stop_trim": True},
    {"custom_params": {"a": 1}}, {"stop_regex": ["a+"]},
]


@pytest.mark.parametrize("kw", VALID, ids=[repr(k) for k in VALID])
def test_valid_edge_values(kw):
    SamplingParams(**kw).verify(vocab_size=VOCAB)


def test_unknown_key_is_type_error():
    with pytest.raises(TypeError, match="temprature"):
        SamplingParams(temprature=1.0)


def test_defaults():
    sp = SamplingParams()
    assert (sp.max_new_tokens, sp.min_new_tokens, sp.temperature, sp.top_p, sp.top_k, sp.min_p) == (128, 0, 1.0, 1.0, -1, 0.0)
    assert (sp.frequency_penalty, sp.presence_penalty, sp.repetition_penalty, sp.n) == (0.0, 0.0, 1.0, 1)
    assert sp.stop is None and sp.stop_token_ids is None and not sp.ignore_eos and sp.skip_special_tokens
    assert sp.spaces_between_special_tokens and not sp.no_stop_trim


def test_helpers():
    assert SamplingParams().stop_strs() == []
    assert SamplingParams(stop="a").stop_strs() == ["a"]
    assert SamplingParams(stop=["a", "b"]).stop_strs() == ["a", "b"]
    assert SamplingParams(temperature=0.0).is_greedy()
    assert SamplingParams(top_k=1).is_greedy()
    assert not SamplingParams(temperature=0.5).is_greedy()


def test_msgpack_round_trip_and_wire_type_check():
    sp = SamplingParams(temperature=0.5, stop=["x"], logit_bias={"3": 1.5}, max_new_tokens=None)
    raw = msgspec.msgpack.encode(sp)
    assert msgspec.msgpack.decode(raw, type=SamplingParams) == sp
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(msgspec.msgpack.encode({"temperature": "hot"}), type=SamplingParams)
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(msgspec.msgpack.encode({"bogus": 1}), type=SamplingParams)
