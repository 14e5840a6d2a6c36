"""``normalize_generate``: shapes, rid rules, n > 1 expansion and sampling validation (API.md 3.3)."""

from __future__ import annotations

import copy

import pytest

from treadle.client.request import make_sampling, normalize_generate
from treadle.runtime.messages import GenerateReq
from treadle.runtime.sampling_params import SamplingParams


def norm(prompt=None, input_ids=None, sampling_params=None, rid=None, stream=False, options=None, preferred=None):
    return normalize_generate(prompt, input_ids, sampling_params, rid, stream, options or {}, preferred)


# ------------------------------------------------------------------ shapes
def test_single_prompt():
    reqs, is_batch = norm("hi")
    assert is_batch is False
    assert len(reqs) == 1
    r = reqs[0]
    assert isinstance(r, GenerateReq)
    assert r.text == "hi" and r.input_ids is None
    assert isinstance(r.sampling, SamplingParams)
    assert r.sampling == SamplingParams()
    assert isinstance(r.rid, str) and len(r.rid) == 32  # uuid4 hex
    assert r.stream is False
    assert r.created > 0


def test_batch_prompt():
    reqs, is_batch = norm(["a", "b", "c"], stream=True)
    assert is_batch is True
    assert [r.text for r in reqs] == ["a", "b", "c"]
    assert all(r.stream for r in reqs)
    assert len({r.rid for r in reqs}) == 3


def test_batch_of_one_is_a_batch():
    reqs, is_batch = norm(["a"])
    assert is_batch is True and len(reqs) == 1


def test_tuple_prompt_is_a_batch():
    reqs, is_batch = norm(("a", "b"))
    assert is_batch and [r.text for r in reqs] == ["a", "b"]


def test_input_ids_single():
    reqs, is_batch = norm(input_ids=[1, 2, 3])
    assert is_batch is False
    assert reqs[0].input_ids == [1, 2, 3] and reqs[0].text is None


def test_input_ids_batch():
    reqs, is_batch = norm(input_ids=[[1, 2], [3], [4, 5, 6]])
    assert is_batch is True
    assert [r.input_ids for r in reqs] == [[1, 2], [3], [4, 5, 6]]


def test_input_ids_are_copied():
    ids = [[1, 2], [3]]
    reqs, _ = norm(input_ids=ids)
    reqs[0].input_ids.append(99)
    assert ids == [[1, 2], [3]]


@pytest.mark.parametrize("bad", [[1, [2]], [[1], 2], [[1, "x"]], ["a", "b"], [[True]], [1.0], "123", 5])
def test_input_ids_bad_types(bad):
    with pytest.raises(TypeError, match="input_ids"):
        norm(input_ids=bad)


@pytest.mark.parametrize("bad", [[], [[]], [[1], []]])
def test_input_ids_empty(bad):
    with pytest.raises(ValueError, match="input_ids cannot be empty"):
        norm(input_ids=bad)


def test_both_prompt_and_ids():
    with pytest.raises(ValueError, match="either prompt or input_ids"):
        norm("hi", [1, 2])


def test_neither_prompt_nor_ids():
    with pytest.raises(ValueError, match="prompt or input_ids"):
        norm()


@pytest.mark.parametrize("bad", ["", ["a", ""]])
def test_empty_prompt(bad):
    with pytest.raises(ValueError, match="prompt cannot be empty"):
        norm(bad)


def test_empty_prompt_list():
    with pytest.raises(ValueError, match="prompt"):
        norm([])


@pytest.mark.parametrize("bad", [5, ["a", 1], [["a"]], b"bytes"])
def test_prompt_bad_type(bad):
    with pytest.raises(TypeError, match="prompt"):
        norm(bad)


# ------------------------------------------------------------------ rids
def test_single_rid_kept():
    reqs, _ = norm("hi", rid="my-rid")
    assert reqs[0].rid == "my-rid"


def test_batch_rid_prefix():
    reqs, _ = norm(["a", "b", "c"], rid="r")
    assert [r.rid for r in reqs] == ["r_0", "r_1", "r_2"]


def test_batch_rid_list():
    reqs, _ = norm(["a", "b"], rid=["x", "y"])
    assert [r.rid for r in reqs] == ["x", "y"]


def test_fresh_rids_unique():
    reqs, _ = norm(["a"] * 10)
    assert len({r.rid for r in reqs}) == 10


@pytest.mark.parametrize("rid", [["x"], ["x", "y", "z"], []])
def test_rid_list_length_mismatch(rid):
    with pytest.raises(ValueError, match="rids length mismatch"):
        norm(["a", "b"], rid=rid)


def test_duplicate_rids():
    with pytest.raises(ValueError, match="Duplicate request IDs"):
        norm(["a", "b"], rid=["x", "x"])


@pytest.mark.parametrize("rid", [5, ["x", 5]])
def test_bad_rid_type(rid):
    with pytest.raises(ValueError, match="rid"):
        norm(["a", "b"], rid=rid)


# ------------------------------------------------------------------ n > 1
def test_n_expansion_prompt_major_batch():
    reqs, is_batch = norm(["p0", "p1"], sampling_params={"n": 3}, rid="r")
    assert is_batch
    assert [r.text for r in reqs] == ["p0"] * 3 + ["p1"] * 3
    assert [r.rid for r in reqs] == ["r_0_0", "r_0_1", "r_0_2", "r_1_0", "r_1_1", "r_1_2"]


def test_n_expansion_with_rid_list():
    reqs, _ = norm(["p0", "p1"], sampling_params={"n": 2}, rid=["a", "b"])
    assert [r.rid for r in reqs] == ["a_0", "a_1", "b_0", "b_1"]


def test_n_expansion_single_prompt_becomes_batch():
    reqs, is_batch = norm("p", sampling_params={"n": 3})
    assert is_batch is True
    assert len(reqs) == 3 and all(r.text == "p" for r in reqs)
    assert len({r.rid for r in reqs}) == 3



def test_n_expansion_single_prompt_rids():
    reqs, _ = norm("p", sampling_params={"n": 3}, rid="x")
    assert [r.rid for r in reqs] == ["x_0", "x_1", "x_2"]


def test_n_expansion_input_ids():
    reqs, is_batch = norm(input_ids=[[1], [2]], sampling_params={"n": 2})
    assert is_batch
    assert [r.input_ids for r in reqs] == [[1], [1], [2], [2]]


def test_n_copies_have_independent_sampling():
    reqs, _ = norm("p", sampling_params={"n": 2, "max_new_tokens": 5})
    assert reqs[0].sampling is not reqs[1].sampling
    reqs[0].sampling.max_new_tokens = 1
    assert reqs[1].sampling.max_new_tokens == 5


def test_n_differs_across_batch():
    with pytest.raises(ValueError, match="parallel_sample_num should be the same"):
        norm(["a", "b"], sampling_params=[{"n": 1}, {"n": 2}])


def test_n_with_list_option_rejected():
    with pytest.raises(ValueError, match="parallel_sample_num"):
        norm(["a", "b"], sampling_params={"n": 2}, options={"logprob_start_len": [0, 1]})


# ------------------------------------------------------------------ sampling params
def test_sampling_list_aligned():
    reqs, _ = norm(["a", "b"], sampling_params=[{"temperature": 0.0}, {"temperature": 0.5, "top_k": 3}])
    assert reqs[0].sampling.temperature == 0.0 and reqs[0].sampling.top_k == -1
    assert reqs[1].sampling.temperature == 0.5 and reqs[1].sampling.top_k == 3


def test_sampling_list_length_mismatch():
    with pytest.raises(ValueError, match="sampling_params has 1 entries"):
        norm(["a", "b"], sampling_params=[{}])


def test_shared_sampling_dict_gives_separate_structs():
    reqs, _ = norm(["a", "b"], sampling_params={"max_new_tokens": 4})
    assert reqs[0].sampling is not reqs[1].sampling
    assert reqs[0].sampling == reqs[1].sampling


def test_sampling_none_entry_in_list():
    reqs, _ = norm(["a", "b"], sampling_params=[None, {"top_p": 0.5}])
    assert reqs[0].sampling == SamplingParams() and reqs[1].sampling.top_p == 0.5


def test_unknown_sampling_key():
    with pytest.raises(TypeError, match="temprature"):
        norm("hi", sampling_params={"temprature": 0.5})


def test_unknown_sampling_key_in_list():
    with pytest.raises(TypeError, match="bogus_key"):
        norm(["a", "b"], sampling_params=[{}, {"bogus_key": 1}])


def test_sampling_not_a_dict():
    with pytest.raises(TypeError, match="sampling_params must be a dict"):
        norm("hi", sampling_params=[["x"]])


@pytest.mark.parametrize("key,value", [
    ("temperature", -1.0), ("top_p", 0.0), ("top_k", 0), ("min_p", 2.0), ("max_new_tokens", -1),
    ("n", 0), ("stop", [""]), ("repetition_penalty", 0.0), ("frequency_penalty", 3.0),
])
def test_bad_sampling_value_names_field(key, value):
    with pytest.raises(ValueError, match=key):
        norm("hi", sampling_params={key: value})


def test_user_dict_not_mutated():
    d = {"max_new_tokens": 4, "stop": ["x"], "n": 2}
    before = copy.deepcopy(d)
    reqs, _ = norm(["a", "b"], sampling_params=d, preferred={"temperature": 0.1})
    reqs[0].sampling.max_new_tokens = 999
    assert d == before
    lst = [{"temperature": 0.5}, {"temperature": 0.7}]
    before = copy.deepcopy(lst)
    norm(["a", "b"], sampling_params=lst, preferred={"top_k": 5})
    assert lst == before


def test_preferred_under_user_values():
    reqs, _ = norm("hi", sampling_params={"temperature": 0.3}, preferred={"temperature": 0.9, "top_k": 7})
    assert reqs[0].sampling.temperature == 0.3 and reqs[0].sampling.top_k == 7
    preferred = {"temperature": 0.9}
    norm("hi", sampling_params={"temperature": 0.3}, preferred=preferred)
    assert preferred == {"temperature": 0.9}


def test_preferred_unknown_key_raises():
    with pytest.raises(TypeError, match="nope"):
        norm("hi", preferred={"nope": 1})


def test_max_new_tokens_set_flag():
    reqs, _ = norm(["a", "b", "c"], sampling_params=[{"max_new_tokens": 3}, {}, None])
    assert [r.max_new_tokens_set for r in reqs] == [True, False, False]
    reqs, _ = norm("a", sampling_params={"max_new_tokens": None})
    assert reqs[0].max_new_tokens_set is True and reqs[0].sampling.max_new_tokens is None
    reqs, _ = norm("a")
    assert reqs[0].max_new_tokens_set is False and reqs[0].sampling.max_new_tokens == 128
    reqs, _ = norm("a", sampling_params={"n": 2, "max_new_tokens": 3})
    assert [r.max_new_tokens_set for r in reqs] == [True, True]


def test_make_sampling_verifies():
    assert make_sampling(None, None) == SamplingParams()
    with pytest.raises(ValueError, match="top_p"):
        make_sampling({"top_p": 1.5}, None)


# ------------------------------------------------------------------ per-item options
def test_options_scalar_broadcast_and_list():
    reqs, _ = norm(["a", "b"], options={"priority": 3, "logprob_start_len": [0, 5]})
    assert [r.priority for r in reqs] == [3, 3]
    assert [r.logprob_start_len for r in reqs] == [0, 5]


def test_options_list_length_mismatch():
    with pytest.raises(ValueError, match="return_logprob has 1 entries"):
        norm(["a", "b"], options={"return_logprob": [True]})


def test_token_ids_logprob_flat_and_nested():
    reqs, _ = norm(["a", "b"], options={"token_ids_logprob": [1, 2]})
    assert [r.token_ids_logprob for r in reqs] == [[1, 2], [1, 2]]
    reqs, _ = norm(["a", "b"], options={"token_ids_logprob": [[1], [2, 3]]})
    assert [r.token_ids_logprob for r in reqs] == [[1], [2, 3]]
    reqs, _ = norm("a", options={"token_ids_logprob": []})
    assert reqs[0].token_ids_logprob is None



def test_token_ids_logprob_nested_length_mismatch():
    with pytest.raises(ValueError, match="token_ids_logprob"):
        norm(["a", "b"], options={"token_ids_logprob": [[1]]})


@pytest.mark.parametrize("key, value", [("stop_regex", r"\d+"), ("structural_tag", "{}")])
def test_unbuilt_sampling_features_are_refused_not_ignored(key, value):
    with pytest.raises(NotImplementedError, match=key):
        norm("p", sampling_params={key: value})


# ------------------------------------------------------------------ values that cannot cross a process boundary
@pytest.mark.parametrize("params, field", [
    ({"sampling_seed": 2**64}, "sampling_seed"), ({"max_new_tokens": 2**64}, "max_new_tokens"),
    ({"top_k": 2**70}, "top_k"), ({"temperature": 2**64}, "temperature"), ({"min_new_tokens": -2**64}, "min_new_tokens"),
    ({"stop_token_ids": [2**70]}, "stop_token_ids"), ({"stop": 5}, "stop"), ({"stop": ["ok", "\ud800"]}, "stop"),
    ({"regex": "a\udfff"}, "regex"), ({"custom_params": {"x": object()}}, "custom_params"),
    ({"custom_params": {"x": 2**70}}, "custom_params"), ({"logit_bias": {"-3": 1.0}}, "logit_bias"),
])
def test_unsendable_sampling_values_name_their_field(params, field):
    with pytest.raises(ValueError, match=field):
        norm("p", sampling_params=params)


def test_prompt_and_rid_text_must_be_unicode_and_rid_non_empty():
    with pytest.raises(ValueError, match="prompt is not valid Unicode"):
        norm("half an emoji \ud83d")
    with pytest.raises(ValueError, match="rid is not valid Unicode"):
        norm("p", rid="r\ud800")
    with pytest.raises(ValueError, match="rid cannot be an empty string"):
        norm("p", rid="")
    with pytest.raises(ValueError, match="rid cannot be an empty string"):
        norm(["a", "b"], rid=["x", ""])


@pytest.mark.parametrize("req, field", [
    (GenerateReq(rid="a", input_ids=[1, 2**70]), "input_ids\\[1\\]"),
    (GenerateReq(rid="a", text="x", priority=2**70), "priority"),
    (GenerateReq(rid="a", text="x", logprob_start_len=-2**70), "logprob_start_len"),
    (GenerateReq(rid="a", text="x", token_ids_logprob=[3, 2**64]), "token_ids_logprob\\[1\\]"),
])
def test_the_wire_check_names_an_unsendable_field(req, field):
    from treadle.client.calls import checked_payload
    from treadle.runtime.messages import GenerateBatch

    with pytest.raises(ValueError, match=f"Invalid request: {field} cannot be sent"):
        checked_payload(GenerateBatch(call_id=1, reqs=[req]))
