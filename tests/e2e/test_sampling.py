"""Sampling parameters, stop rules, n > 1, seeds and logprobs through the whole engine (issue 3)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.e2e

PROMPT = "Once upon a time, in a small village,"


def test_logprobs_match_hf(engine, hf_gguf_model, hf_tokenizer):
    """Prompt and output logprobs (greedy and sampled) equal log_softmax of HF's logits; top-k in order."""
    ids = hf_tokenizer(PROMPT)["input_ids"]
    for params in ({"temperature": 0, "max_new_tokens": 8}, {"temperature": 0.9, "top_p": 0.95, "max_new_tokens": 8}):
        res = engine.generate(input_ids=ids, sampling_params=params, return_logprob=True, logprob_start_len=0,
                              top_logprobs_num=5, token_ids_logprob=[11, 42])
        meta = res["meta_info"]
        out = res["output_ids"]
        with torch.no_grad():
            logits = hf_gguf_model(torch.tensor([ids + out])).logits[0].float()
        ref = torch.log_softmax(logits, dim=-1)
        inp = meta["input_token_logprobs"]
        assert len(inp) == len(ids) and inp[0] == (None, ids[0], None)
        for p in range(1, len(ids)):
            lp, tok, text = inp[p]
            assert tok == ids[p] and text is None
            assert abs(lp - ref[p - 1, ids[p]].item()) < 1e-4
        outs = meta["output_token_logprobs"]
        assert len(outs) == len(out) == meta["output_token_logprobs_length"]
        for k, (lp, tok, _) in enumerate(outs):
            pos = len(ids) - 1 + k
            assert tok == out[k] and abs(lp - ref[pos, tok].item()) < 1e-4
            top = meta["output_top_logprobs"][k]
            want = torch.topk(ref[pos], 5)
            assert [t for _, t, _ in top] == want.indices.tolist()
            assert all(abs(a - b) < 1e-4 for (a, _, _), b in zip(top, want.values.tolist()))
            pair = meta["output_token_ids_logprobs"][k]
            assert [t for _, t, _ in pair] == [11, 42]
            assert abs(pair[1][0] - ref[pos, 42].item()) < 1e-4
        assert meta["input_top_logprobs"][0] is None and len(meta["input_top_logprobs"][1]) == 5


def test_logprobs_stream_incrementally(engine):
    chunks = list(engine.generate(prompt=PROMPT, sampling_params={"temperature": 0, "max_new_tokens": 6},
                                  return_logprob=True, stream=True))
    per_chunk = [c["meta_info"]["output_token_logprobs"] for c in chunks]
    assert sum(len(x) for x in per_chunk) == 6
    assert all(len(x) == len(c["output_ids"]) for x, c in zip(per_chunk, chunks))


def test_usage_guide_logprobs_example(engine):
    response = engine.generate(
        prompt="The capital of France is",
        sampling_params={"max_new_tokens": 5},
        return_logprob=True,
        top_logprobs_num=3
    )
    lines = [f"Token logprob: {t}" for t in response["meta_info"]["output_token_logprobs"]]
    lines += [f"Top 3 alternatives: {t}" for t in response["meta_info"]["output_top_logprobs"]]
    assert len(lines) == 2 * response["meta_info"]["completion_tokens"]
    assert all(len(top) == 3 for top in response["meta_info"]["output_top_logprobs"])


def test_same_seed_same_text_alone_and_in_a_crowd(engine):
    params = {"temperature": 1.0, "max_new_tokens": 24, "sampling_seed": 1234, "ignore_eos": True}
    alone = engine.generate(prompt=PROMPT, sampling_params=params)["output_ids"]
    crowd = [PROMPT] + [f"Story number {i}:" for i in range(16)]
    sps = [params] + [{"temperature": 1.0, "max_new_tokens": 24, "ignore_eos": True}] * 16
    res = engine.generate(prompt=crowd, sampling_params=sps)
    assert res[0]["output_ids"] == alone
    other = engine.generate(prompt=PROMPT, sampling_params={**params, "sampling_seed": 4321})["output_ids"]
    assert other != alone


def test_n_returns_prompt_major_results(engine):
    res = engine.generate(prompt=["Red", "Blue"], sampling_params={"n": 4, "temperature": 1.0, "max_new_tokens": 4},
                          rid="nn")
    assert len(res) == 8
    assert [r["meta_info"]["id"] for r in res] == [f"nn_{i}_{j}" for i in range(2) for j in range(4)]
    single = engine.generate(prompt="Red", sampling_params={"n": 3, "temperature": 0, "max_new_tokens": 4})
    assert len(single) == 3 and len({tuple(r["output_ids"]) for r in single}) == 1


def test_stop_string(engine):
    base = engine.generate(prompt=PROMPT, sampling_params={"temperature": 0, "max_new_tokens": 40})
    text = base["text"]
    word = text.split()[3]
    res = engine.generate(prompt=PROMPT, sampling_params={"temperature": 0, "max_new_tokens": 40, "stop": [word]})
    assert res["meta_info"]["finish_reason"] == {"type": "stop", "matched": word}
    assert res["text"] == text[: text.index(word)]
    kept = engine.generate(prompt=PROMPT, sampling_params={"temperature": 0, "max_new_tokens": 40, "stop": word,
                                                           "no_stop_trim": True})
    assert kept["text"].endswith(word) and kept["text"] == text[: text.index(word) + len(word)]
    streamed = "".join(c["text"] for c in engine.generate(
        prompt=PROMPT, sampling_params={"temperature": 0, "max_new_tokens": 40, "stop": [word]}, stream=True))
    assert streamed == res["text"]


def test_stop_token_ids_and_eos_and_length(engine):
    base = engine.generate(prompt=PROMPT, sampling_params={"temperature": 0, "max_new_tokens": 20, "ignore_eos": True})
    tok = base["output_ids"][5]
    res = engine.generate(prompt=PROMPT, sampling_params={"temperature": 0, "max_new_tokens": 20,
                                                          "stop_token_ids": [tok]})
    k = base["output_ids"].index(tok)
    assert res["output_ids"] == base["output_ids"][: k + 1]
    assert res["meta_info"]["finish_reason"] == {"type": "stop", "matched": tok}
    chat = engine.generate(prompt="<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n",
                           sampling_params={"temperature": 0, "max_new_tokens": 64})
    assert chat["meta_info"]["finish_reason"] == {"type": "stop", "matched": 2}
    assert chat["output_ids"][-1] == 2 and "<|im_end|>" not in chat["text"]
    length = engine.generate(prompt=PROMPT, sampling_params={"temperature": 0, "max_new_tokens": 3})
    assert length["meta_info"]["finish_reason"] == {"type": "length", "length": 3}


def test_min_new_tokens_holds_back_eos(engine):
    prompt = "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    short = engine.generate(prompt=prompt, sampling_params={"temperature": 0, "max_new_tokens": 64})
    n = short["meta_info"]["completion_tokens"]
    longer = engine.generate(prompt=prompt, sampling_params={"temperature": 0, "max_new_tokens": 64,
                                                            "min_new_tokens": n + 5})
    assert longer["meta_info"]["completion_tokens"] >= n + 5
    assert 2 not in longer["output_ids"][: n + 5]


def test_penalties_and_logit_bias_change_greedy_output(engine):
    base = engine.generate(prompt=PROMPT, sampling_params={"temperature": 0, "max_new_tokens": 30})["output_ids"]
    rep = engine.generate(prompt=PROMPT, sampling_params={"temperature": 0, "max_new_tokens": 30,
                                                          "repetition_penalty": 2.0})["output_ids"]
    assert rep != base
    first = base[0]
    biased = engine.generate(prompt=PROMPT, sampling_params={"temperature": 0, "max_new_tokens": 3,
                                                             "logit_bias": {str(first): -100.0}})["output_ids"]
    assert biased[0] != first
    forced = engine.generate(prompt=PROMPT, sampling_params={"temperature": 0, "max_new_tokens": 3,
                                                             "logit_bias": {"42": 100.0}})["output_ids"]
    assert forced == [42, 42, 42]


def test_usage_guide_sampling_parameters_example(engine):
    sampling_params = {
        "max_new_tokens": 256,
        "min_new_tokens": 10,
        "temperature": 0.8,
        "top_p": 0.95,
        "top_k": 50,
        "min_p": 0.05,
        "frequency_penalty": 0.5,
        "presence_penalty": 0.5,
        "repetition_penalty": 1.1,
        "stop": ["\n\n", "END"],
        "stop_token_ids": [128001, 128009],
        "ignore_eos": False,
        "skip_special_tokens": True,
        "n": 1
    }
    response = engine.generate(
        prompt="Write a function to compute fibonacci",
        sampling_params=sampling_params
    )
    assert response["meta_info"]["completion_tokens"] >= 10
    assert "\n\n" not in response["text"] and "END" not in response["text"]


INVALID = [
    ("max_new_tokens", -1), ("max_new_tokens", 1.5), ("min_new_tokens", -1), ("temperature", -0.5),
    ("temperature", float("nan")), ("temperature", float("inf")), ("top_p", 0.0), ("top_p", 1.5), ("top_k", 0),
    ("top_k", -2), ("min_p", -0.1), ("min_p", 1.1), ("frequency_penalty", 2.5), ("frequency_penalty", -2.5),
    ("presence_penalty", 3), ("presence_penalty", -3), ("repetition_penalty", 0.0), ("repetition_penalty", 2.5),
    ("n", 0), ("stop", [""]), ("stop", [1]), ("stop_token_ids", [-1]), ("logit_bias", {"-1": 1.0}),
    ("logit_bias", {"99999999": 1.0}), ("logit_bias", {"x": 1.0}), ("stream_interval", 0),
]


@pytest.mark.parametrize("field, value", INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_sampling_values(engine, field, value):
    with pytest.raises(ValueError, match=field):
        engine.generate(prompt="Hi", sampling_params={field: value})
    assert engine.generate(prompt="Hi", sampling_params={"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2


def test_two_grammars_and_min_over_max(engine):
    with pytest.raises(ValueError, match="Only one of regex, json_schema, or ebnf"):
        engine.generate(prompt="Hi", sampling_params={"regex": "a", "ebnf": "root ::= \"a\""})
    with pytest.raises(ValueError, match="min_new_tokens"):
        engine.generate(prompt="Hi", sampling_params={"min_new_tokens": 10, "max_new_tokens": 5})
    with pytest.raises(TypeError, match="bogus"):
        engine.generate(prompt="Hi", sampling_params={"bogus": 1})


def test_hidden_states_need_the_server_flag(engine):
    with pytest.raises(ValueError, match="hidden states"):
        engine.generate(prompt="Hello", return_hidden_states=True, sampling_params={"max_new_tokens": 5})


def test_custom_processor_needs_the_server_flag(engine):
    with pytest.raises(ValueError, match="custom logit processor"):
        engine.generate(prompt="Hi", custom_logit_processor="DisallowedTokensLogitsProcessor")


def test_stream_interval(engine):
    chunks = list(engine.generate(prompt=PROMPT, stream=True, sampling_params={
        "temperature": 0, "max_new_tokens": 12, "ignore_eos": True, "stream_interval": 4}))
    assert [len(c["output_ids"]) for c in chunks] == [1, 4, 4, 3]


def test_skip_special_tokens_off_keeps_eos_text(engine):
    prompt = "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    res = engine.generate(prompt=prompt, sampling_params={"temperature": 0, "max_new_tokens": 64,
                                                          "skip_special_tokens": False, "no_stop_trim": True})
    assert res["text"].endswith("<|im_end|>")
