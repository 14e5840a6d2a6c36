"""SGLang's session semantics (issue 21), ported from SGLang's ``test/srt/test_session_control.py``.

A session's turns form a tree: a turn continues from the turn ``rid`` names; with ``replace=True``
it branches there and deletes the turns after it, so a later turn naming one is refused (and a
deleted turn that still runs is aborted). A later turn's ``logprob_start_len`` counts positions in
its whole context, earlier turns included. Every turn must give what a stateless request on the
same context gives.
"""

from __future__ import annotations

import asyncio

import pytest

pytestmark = pytest.mark.e2e

GEN_LEN = 12


def params(max_new_tokens: int) -> dict:
    return {"temperature": 0, "max_new_tokens": max_new_tokens, "no_stop_trim": True, "skip_special_tokens": False}


def rounded(entries: list) -> list[float]:
    """The logprobs of ``(logprob, token id, text)`` entries, as SGLang's test rounds them."""
    return [round(lp, 2) for lp, _, _ in entries if lp is not None]


def assert_close(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b), "logprobs must have equal length"
    for x, y in zip(a, b):
        assert abs(x - y) <= 0.1, f"logprobs {x} and {y} differ by more than 0.1"


def test_session_control(engine, hf_tokenizer):
    """SGLang's ``test_session_control``: a chain of turns, each replacing its parent's last token
    (``offset=-1``), asking input logprobs from the start of its new text; then a branch back to the
    first turn. The same contexts sent without a session give the same outputs and logprobs."""
    chunks = ["Let me tell you something about France.", "The capital of France is",
              "The population of the city is", "A brief history about that city is"]
    chunks_ids = [hf_tokenizer(c)["input_ids"] for c in chunks]

    # 1. with a session
    engine.flush_cache()
    sid = engine.open_session(capacity_of_str_len=1000)
    assert engine.open_session(capacity_of_str_len=1000, session_id=sid) is None  # already open

    rid = first_rid = None
    outputs_session, logprobs_session, input_logprobs_session = [], [], []
    cur_logprob_start_len = 0
    for i, chunk_ids in enumerate(chunks_ids):
        max_new_tokens = GEN_LEN if i > 0 else 1  # prefill only for the first chunk
        res = engine.generate(
            input_ids=chunk_ids, sampling_params=params(max_new_tokens), return_logprob=True,
            session_params={"id": sid, "rid": rid, "offset": -1, "replace": True},
            logprob_start_len=cur_logprob_start_len - 1)  # a position of the whole context
        meta = res["meta_info"]
        rid = meta["id"]
        if i == 0:
            first_rid = rid
        else:
            outputs_session.append(res["text"])
            logprobs_session += rounded(meta["output_token_logprobs"])
            # input logprobs from logprob_start_len to the end of the turn's whole context
            assert len(meta["input_token_logprobs"]) == meta["prompt_tokens"] - (cur_logprob_start_len - 1)
            input_logprobs_session.append(meta["input_token_logprobs"])
        cur_logprob_start_len += len(chunk_ids) + max_new_tokens

    # a logprob_start_len past the turn's whole context is refused
    with pytest.raises(ValueError, match=r"logprob_start_len \(\d+\) is larger than the prompt length"):
        engine.generate(input_ids=chunk_ids, sampling_params=params(GEN_LEN), return_logprob=True,
                        session_params={"id": sid, "rid": rid, "offset": -1, "replace": True},
                        logprob_start_len=cur_logprob_start_len + len(chunk_ids))

    # backtrack to the first turn and regenerate: the turns after it are deleted
    res = engine.generate(input_ids=chunks_ids[-1], sampling_params=params(GEN_LEN), return_logprob=True,
                          session_params={"id": sid, "rid": first_rid, "offset": -1, "replace": True},
                          logprob_start_len=0)
    outputs_session.append(res["text"])
    logprobs_session += rounded(res["meta_info"]["output_token_logprobs"])

    # the last turn was deleted by the backtrack: naming it is refused
    with pytest.raises(ValueError, match=f"Invalid request session id: rid {rid} is not a turn"):
        engine.generate(input_ids=chunks_ids[-1], sampling_params=params(GEN_LEN), return_logprob=True,
                        session_params={"id": sid, "rid": rid, "offset": -1, "replace": True})

    engine.close_session(sid)
    with pytest.raises(ValueError, match="does not exist"):  # a closed session refuses turns
        engine.generate(input_ids=chunks_ids[-1], sampling_params=params(GEN_LEN), return_logprob=True,
                        session_params={"id": sid, "rid": first_rid, "offset": -1, "replace": True})

    # 2. the same contexts without a session
    engine.flush_cache()
    input_ids: list[int] = []
    first_ids: list[int] = []
    outputs_normal, logprobs_normal = [], []
    start = 0
    for i, chunk_ids in enumerate(chunks_ids):
        input_ids += chunk_ids
        max_new_tokens = GEN_LEN if i > 0 else 1
        res = engine.generate(input_ids=input_ids, sampling_params=params(max_new_tokens), return_logprob=True,
                              logprob_start_len=start - 1 if i > 0 else -1)
        if i > 0:
            input_ids += res["output_ids"][:-1]  # offset=-1 dropped each turn's last token
            outputs_normal.append(res["text"])
            logprobs_normal += rounded(res["meta_info"]["output_token_logprobs"])
            session_inputs = input_logprobs_session[i - 1]
            normal_inputs = res["meta_info"]["input_token_logprobs"]
            assert [t for _, t, _ in session_inputs] == [t for _, t, _ in normal_inputs]
            assert_close(rounded(session_inputs), rounded(normal_inputs))
        else:
            first_ids = list(input_ids)
        start += len(chunk_ids) + max_new_tokens
    res = engine.generate(input_ids=first_ids + chunks_ids[-1], sampling_params=params(GEN_LEN), return_logprob=True)
    outputs_normal.append(res["text"])
    logprobs_normal += rounded(res["meta_info"]["output_token_logprobs"])

    assert outputs_session == outputs_normal
    assert_close(logprobs_session, logprobs_normal)


def run_branching(engine, tok, root_prompt: str, chunks_per_step: list[list[str]], gen_len: int) -> None:
    """SGLang's ``run_session_control_with_branching``: branches grow side by side from one root
    turn, each turn naming its branch's previous one; the stateless reference sends each branch's
    whole context as ids (turns join ids, not re-tokenized text)."""
    engine.flush_cache()
    sid = engine.open_session(capacity_of_str_len=1000)
    outputs_session = []
    res = engine.generate(prompt=root_prompt, sampling_params=params(gen_len),
                          session_params={"id": sid, "rid": None, "offset": 0, "replace": False})
    rid_per_branch = [res["meta_info"]["id"]] * len(chunks_per_step[0])
    outputs_session.append(res["text"])
    for chunks in chunks_per_step:
        for j, chunk in enumerate(chunks):
            res = engine.generate(prompt=chunk, sampling_params=params(gen_len),
                                  session_params={"id": sid, "rid": rid_per_branch[j], "offset": 0, "replace": False})
            rid_per_branch[j] = res["meta_info"]["id"]
            outputs_session.append(res["text"])
    engine.close_session(sid)

    engine.flush_cache()
    outputs_normal = []
    res = engine.generate(prompt=root_prompt, sampling_params=params(gen_len))
    outputs_normal.append(res["text"])
    contexts = [tok(root_prompt)["input_ids"] + res["output_ids"] for _ in chunks_per_step[0]]
    for chunks in chunks_per_step:
        for j, chunk in enumerate(chunks):
            contexts[j] += tok(chunk)["input_ids"]
            res = engine.generate(input_ids=contexts[j], sampling_params=params(gen_len))
            outputs_normal.append(res["text"])
            contexts[j] += res["output_ids"]
    assert outputs_session == outputs_normal


def test_session_control_with_branching(engine, hf_tokenizer):
    run_branching(engine, hf_tokenizer, "First, let me explain in one sentence about AI",
                  [["Then, briefly, the positive side of AI is", "But, briefly, AI could be harmful to human"],
                   ["For example", "For example"]], gen_len=8)
    run_branching(engine, hf_tokenizer, "I have three apples.",
                  [["I then give one apple to my friend", "My friend give me another apple."],
                   ["I still have", "I now have"]], gen_len=8)


def test_replace_aborts_a_running_turn_it_deletes(engine, hf_tokenizer):
    """SGLang's ``clear_children``: a turn that still runs when a ``replace=True`` turn branches
    before it is aborted; the new branch runs, and the deleted turn cannot be continued."""
    sid = engine.open_session(capacity_of_str_len=1000)
    root = engine.generate(prompt="Once upon a time", sampling_params=params(4), session_params={"id": sid})
    root_rid = root["meta_info"]["id"]

    async def branch_while_a_turn_runs():
        long = asyncio.ensure_future(engine.async_generate(
            prompt=" there was a dragon.", session_params={"id": sid, "rid": root_rid},
            sampling_params={"max_new_tokens": 400, "ignore_eos": True, "temperature": 0}))
        await asyncio.sleep(1.0)
        assert not long.done()
        new = await engine.async_generate(prompt=" there was a cat.", sampling_params=params(4),
                                          session_params={"id": sid, "rid": root_rid, "replace": True})
        return await long, new

    deleted, new = asyncio.run(branch_while_a_turn_runs())
    assert deleted["meta_info"]["finish_reason"]["type"] == "abort"
    assert deleted["meta_info"]["completion_tokens"] < 400
    assert new["meta_info"]["finish_reason"]["type"] == "length"
    with pytest.raises(ValueError, match="Invalid request session id"):
        engine.generate(prompt=" And?", session_params={"id": sid, "rid": deleted["meta_info"]["id"]})
    # the new branch continues (and the default parent is the latest finished turn: the new one)
    cont = engine.generate(prompt=" And?", sampling_params=params(2), session_params={"id": sid})
    added = len(hf_tokenizer(" And?")["input_ids"])
    assert cont["meta_info"]["prompt_tokens"] == new["meta_info"]["prompt_tokens"] + 4 + added
    engine.close_session(sid)
    state = engine._check_integrity()
    assert state["num_running"] == 0 and state["num_sessions"] == 0 and state["locked_pages"] == 0
