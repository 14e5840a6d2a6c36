"""Client result shapes: ``BatchResult`` (list + column access) and ``ReqState`` chunk building."""

from __future__ import annotations

import time

import pytest

from treadle.client.results import BatchResult, ReqState
from treadle.runtime.messages import FinishReason, StrOut

FINAL_KEYS = {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens",
              "weight_version", "num_retractions", "response_sent_to_client_ts", "e2e_latency"}
TIME_STATS = {"queue_time": 0.5, "prefill_launch_delay": 0.001, "prefill_launch_latency": 0.2}


# ------------------------------------------------------------------ BatchResult
def make_batch() -> BatchResult:
    return BatchResult([
        {"text": "a", "output_ids": [1], "meta_info": {"id": "r0"}},
        {"text": "b", "output_ids": [2, 3], "meta_info": {"id": "r1"}},
        {"text": "c", "output_ids": [], "meta_info": {"id": "r2"}},
    ])


def test_batch_is_a_list():
    res = make_batch()
    assert isinstance(res, list)
    assert len(res) == 3
    assert res[0]["text"] == "a" and res[-1]["text"] == "c"
    assert [r["text"] for r in res] == ["a", "b", "c"]
    assert res == [dict(r) for r in res]
    assert res[1:] == [res[1], res[2]]


def test_batch_column_access():
    res = make_batch()
    assert res["text"] == ["a", "b", "c"]
    assert res["output_ids"] == [[1], [2, 3], []]
    assert [m["id"] for m in res["meta_info"]] == ["r0", "r1", "r2"]
    assert res["text"][0] == res[0]["text"]
    for t, r in zip(res["text"], res):
        assert t == r["text"]


def test_batch_missing_column():
    with pytest.raises(KeyError):
        make_batch()["embedding"]


def test_batch_bad_index():
    res = make_batch()
    with pytest.raises(IndexError):
        res[3]
    with pytest.raises(TypeError):
        res[1.0]


def test_empty_batch_columns():
    assert BatchResult([])["text"] == []


def test_embedding_column():
    res = BatchResult([{"embedding": [0.1, 0.2], "meta_info": {}}, {"embedding": [0.3], "meta_info": {}}])
    assert res["embedding"] == [[0.1, 0.2], [0.3]]


# ------------------------------------------------------------------ ReqState
def collect(stream: bool, incremental: bool, index=None, outs=None):
    st = ReqState("rid-1", time.time() - 0.01, deliver=lambda item: None, index=index)
    outs = outs or [
        StrOut("rid-1", [1, 2], None, 4, 2, 1, text="Hel"),
        StrOut("rid-1", [3], None, 4, 3, 1, text="lo"),
        StrOut("rid-1", [4], FinishReason(type="stop", matched=4), 4, 4, 1, text="!"),
    ]
    chunks = [st.update(o, incremental=incremental, stream=stream) for o in outs]
    return st, chunks


def test_incremental_stream_chunks():
    st, chunks = collect(stream=True, incremental=True)
    assert [c["text"] for c in chunks] == ["Hel", "lo", "!"]
    assert [c["output_ids"] for c in chunks] == [[1, 2], [3], [4]]
    assert [c["meta_info"]["completion_tokens"] for c in chunks] == [2, 3, 4]
    assert [c["meta_info"]["finish_reason"] for c in chunks] == [None, None, {"type": "stop", "matched": 4}]
    assert all("index" not in c for c in chunks)
    assert st.finished and st.text == "Hello!" and st.output_ids == [1, 2, 3, 4]


def test_cumulative_stream_chunks():
    _, chunks = collect(stream=True, incremental=False)
    assert [c["text"] for c in chunks] == ["Hel", "Hello", "Hello!"]
    assert [c["output_ids"] for c in chunks] == [[1, 2], [1, 2, 3], [1, 2, 3, 4]]
    # chunks do not share the live list (SGLang quirk not copied)
    assert chunks[0]["output_ids"] is not chunks[1]["output_ids"]


def test_non_stream_returns_only_final():
    st, chunks = collect(stream=False, incremental=True)
    assert chunks[:2] == [None, None]
    final = chunks[2]
    assert final["text"] == "Hello!" and final["output_ids"] == [1, 2, 3, 4]
    assert "index" not in final


@pytest.mark.parametrize("stream,incremental", [(True, True), (True, False), (False, True), (False, False)])
def test_meta_info_keys(stream, incremental):
    _, chunks = collect(stream=stream, incremental=incremental)
    final = chunks[-1]["meta_info"]
    assert set(final) == FINAL_KEYS
    assert final["id"] == "rid-1"
    assert (final["prompt_tokens"], final["completion_tokens"], final["cached_tokens"]) == (4, 4, 1)
    assert isinstance(final["e2e_latency"], float) and final["e2e_latency"] >= 0.01
    assert final["num_retractions"] == 0 and final["reasoning_tokens"] == 0
    assert abs(final["response_sent_to_client_ts"] - time.time()) < 5
    for c in chunks[:-1]:
        if c is not None:
            assert set(c["meta_info"]) == FINAL_KEYS - {"e2e_latency"}
            assert c["meta_info"]["finish_reason"] is None


@pytest.mark.parametrize("stream", [True, False])
def test_time_stats_and_retractions_reach_meta_info(stream):
    """The scheduler sends the time stats once (enable_metrics); every later chunk keeps them."""
    outs = [
        StrOut("rid-1", [1, 2], None, 4, 2, 1, num_retractions=1, time_stats=TIME_STATS, text="Hel"),
        StrOut("rid-1", [3], None, 4, 3, 1, num_retractions=1, text="lo"),
        StrOut("rid-1", [4], FinishReason(type="stop", matched=4), 4, 4, 1, num_retractions=2, text="!"),
    ]
    _, chunks = collect(stream=stream, incremental=True, outs=outs)
    for c in chunks:
        if c is not None:
            assert set(c["meta_info"]) >= set(TIME_STATS)
            assert {k: c["meta_info"][k] for k in TIME_STATS} == TIME_STATS
    assert chunks[-1]["meta_info"]["num_retractions"] == 2


def test_embedding_meta_info_keys():
    st = ReqState("e-1", time.time(), deliver=lambda item: None)
    out = StrOut("e-1", [], FinishReason(type="length", length=0), 3, embedding=b"\0" * 8, num_retractions=1, text="")
    meta = st.update(out, incremental=False, stream=False)["meta_info"]
    assert set(meta) == {"id", "finish_reason", "prompt_tokens", "weight_version", "num_retractions", "e2e_latency"}
    assert meta["num_retractions"] == 1


def test_index_only_in_streams():
    _, chunks = collect(stream=True, incremental=True, index=2)
    assert [c["index"] for c in chunks] == [2, 2, 2]
    _, chunks = collect(stream=False, incremental=True, index=2)
    assert "index" not in chunks[-1]


def test_finish_reason_formats_in_meta():
    for fin, js in [
        (FinishReason(type="length", length=3), {"type": "length", "length": 3}),
        (FinishReason(type="abort", message="Aborted"), {"type": "abort", "message": "Aborted"}),
        (FinishReason(type="stop", matched="\n"), {"type": "stop", "matched": "\n"}),
    ]:
        _, chunks = collect(stream=False, incremental=True, outs=[StrOut("rid-1", [1], fin, 1, 1, 0, text="x")])
        assert chunks[0]["meta_info"]["finish_reason"] == js


def test_single_final_output_with_empty_text():
    _, chunks = collect(stream=True, incremental=True,
                        outs=[StrOut("rid-1", [], FinishReason(type="abort", message="Abort in waiting queue"), text="")])
    (c,) = chunks
    assert c["text"] == "" and c["output_ids"] == []
    assert c["meta_info"]["finish_reason"]["type"] == "abort" and c["meta_info"]["completion_tokens"] == 0


def test_chunk_output_ids_are_copies():
    st, chunks = collect(stream=True, incremental=True)
    chunks[0]["output_ids"].append(99)
    assert st.output_ids == [1, 2, 3, 4]
