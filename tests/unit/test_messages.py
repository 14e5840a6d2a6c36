"""The wire schema: msgpack round trips through each socket's union, and hostile frames are rejected."""

from __future__ import annotations

import pickle
import typing

import msgspec
import pytest

from treadle.runtime import messages as M
from treadle.runtime.sampling_params import SamplingParams

SP = SamplingParams(temperature=0.0, stop=["\n"], stop_token_ids=[2], max_new_tokens=None, logit_bias={"5": -1.0})
FIN_STOP = M.FinishReason(type="stop", matched="\n")
FIN_TOK = M.FinishReason(type="stop", matched=2)
FIN_LEN = M.FinishReason(type="length", length=7)
FIN_ABORT = M.FinishReason(type="abort", message="Aborted")
FIN_400 = M.FinishReason(type="abort", message="bad", status_code=400)
CLIENT_CALLS = [  # what the client asks the tokenizer and the schedulers
    M.GetInternalState(call_id=8), M.CheckIntegrity(call_id=9, dp_rank=2), M.FlushCache(), M.ListSessions(),
    M.CloseSession(session_id="s"), M.FreezeGC(), M.UnloadLoraAdapter(call_id=10, lora_name="a"), M.StopProfile(),
    M.OpenSession(session_id="t"), M.LoadLoraAdapter(lora_name="b", lora_path="/q"), M.StartProfile(), M.GetLoad(),
]
WEIGHT_CALLS = [  # client -> scheduler -> workers
    M.UpdateWeightsFromDisk(call_id=11, model_dir="/ckpt/step1", load_format="safetensors"),
    M.UpdateWeightsFromTensor(call_id=12, shm_name="psm_1", flush_cache=False, tensors=[
        M.TensorRef(name="model.norm.weight", dtype="bfloat16", shape=[576], offset=0),
        M.TensorRef(name="lm_head.weight", dtype="float32", shape=[49152, 576], offset=1152)]),
    M.GetWeightsByName(call_id=13, name="model.embed_tokens.weight", truncate_size=5),
    M.InitWeightsUpdateGroup(call_id=14, master_address="10.0.0.1", master_port=29500, rank_offset=1, world_size=3,
                             group_name="g", backend="gloo"),
    M.UpdateWeightsFromDistributed(call_id=15, names=["model.norm.weight"], dtypes=["bfloat16"], shapes=[[576]],
                                   group_name="g", flush_cache=False),
    M.DestroyWeightsUpdateGroup(call_id=16, group_name="g"),
    M.ReleaseMemoryOccupation(call_id=17, tags=["weights", "kv_cache"]), M.ResumeMemoryOccupation(tags=["weights"]),
]
CLIENT_CALLS += [*WEIGHT_CALLS, M.UpdateWeightsFromDisk(call_id=18, model_dir="/ckpt/step2", phase="check"),
                 M.FinishWeightUpdate(call_id=19, dp_rank=1, action="apply")]  # the DP groups' steps

SAMPLES = {
    "TOKENIZER_IN": [
        M.GenerateBatch(call_id=1, reqs=[
            M.GenerateReq(rid="a", text="hi", sampling=SP, stream=True, created=1.5, max_new_tokens_set=True),
            M.GenerateReq(rid="b", input_ids=[1, 2, 3], token_ids_logprob=[4], priority=-2),
        ]),
        M.GenerateBatch(call_id=2, reqs=[]),
        M.AbortReq(rid="a"), M.AbortReq(abort_all=True),
        M.FlushCache(call_id=3),
        M.StartProfile(call_id=4, options={"a": [1, 2.5, None, "s", {"n": True}]}),
        M.GetLoad(call_id=5, dp_rank=-1), M.ReqsDone(rids=["a", "b"]),
        M.OpenSession(call_id=6, dp_rank=1, session_id="s", timeout=2.5, streaming=True),
        M.LoadLoraAdapter(call_id=7, lora_name="a", lora_path="/p", pinned=True),
        M.GroupDown(dp_rank=1, message="The dp1_worker0 process exited"), M.Shutdown(), *CLIENT_CALLS,
    ],
    "SCHEDULER_IN": [
        M.TokenizedBatch(reqs=[M.TokenizedReq(rid="a", input_ids=[1, 2], sampling=SP, stream=True, created=3.0),
                               M.TokenizedReq(rid="b", input_ids=[9], sampling=SamplingParams())]),
        M.AbortReq(rid="zz"), M.GetInternalState(call_id=1), M.CloseSession(call_id=2, session_id="s"), M.Shutdown(),
        M.StepResult(step=5, next_token_ids=[1, 2, 3]), M.StepResult(step=0),
        M.Reply(call_id=1, ok=True, result={"context_len": 256, "kv_tokens": 512}),
        M.Reply(call_id=2, ok=False, error="boom"), *CLIENT_CALLS,
    ],
    "WORKER_IN": [
        M.ForwardPlan(step=1, new_slots=[M.NewSlot(0, M.SamplingSpec(temperature=0.0, top_k=1, seed=3))],
                      prefix_writes=[M.PrefixWrite(0, [0, 1])],
                      rows=[M.PlanRow(0, [1, 2, 3], 0, [0, 1, 2]), M.PlanRow(1, [4], 9, [17], sample=False)]),
        M.ForwardPlan(step=2), M.SyncStep(),
        M.GetWorkerInfo(call_id=1), M.ReadLoraAdapter(call_id=2, name="a", path="/p"), M.StopProfile(), M.Shutdown(),
        M.StartProfile(options={"num_steps": 3}), M.DropLoraAdapter(name="a"), *WEIGHT_CALLS,
    ],
    "DETOKENIZER_IN": [
        M.TokenOutBatch(outs=[
            M.TokenOut("a", [1, 2], FIN_STOP, 3, 2, 0, context_ids=[7, 8], skip_special_tokens=True,
                       spaces_between_special_tokens=True, trim_stop_str="\n", trim_last_token=False),
            M.TokenOut("b", [5], None, prompt_tokens=1, completion_tokens=1),
            M.TokenOut("c", [], FIN_ABORT),
            M.TokenOut("d", [2], FIN_TOK, trim_last_token=True),
        ]),
        M.FreezeGC(), M.Shutdown(),
    ],
    "CLIENT_IN": [
        M.StrOutBatch(outs=[M.StrOut("a", [1, 2], FIN_LEN, 3, 2, 1, text="hello"), M.StrOut("b", [], text=""),
                            M.StrOut("c", [1], FIN_400, text="x")]),
        M.ReqError(kind="value", message="bad", call_id=3), M.Heartbeat(name="scheduler"), M.ReqError(kind="type", message="t", rids=["a", "b"]),
        M.Reply(call_id=1, ok=True, result=[1, "two"]), M.Reply(call_id=2, ok=False, error="e"),
        M.ChildReady(name="scheduler", info={"max_total_tokens": 512}), M.ChildReady(name="worker0"),
        M.ChildFailed(name="worker0", error="Traceback ..."),
    ],
}


def _union(name: str):
    return getattr(M, name)


def _cases():
    for name, msgs in SAMPLES.items():
        for m in msgs:
            yield pytest.param(name, m, id=f"{name}-{type(m).__name__}")


@pytest.mark.parametrize("union,msg", list(_cases()))
def test_round_trip(union, msg):
    raw = msgspec.msgpack.encode(msg)
    got = msgspec.msgpack.Decoder(_union(union)).decode(raw)
    assert type(got) is type(msg)
    assert got == msg


def test_every_union_member_is_covered():
    for name, msgs in SAMPLES.items():
        members = set(typing.get_args(_union(name)))
        assert {type(m) for m in msgs} == members, name


def test_tags_are_class_names():
    raw = msgspec.msgpack.encode(M.AbortReq(rid="x"))
    assert msgspec.msgpack.decode(raw) == {"type": "AbortReq", "rid": "x"}


def _foreign_messages():
    all_msgs = [m for msgs in SAMPLES.values() for m in msgs]
    for name in SAMPLES:
        members = set(typing.get_args(_union(name)))
        for m in all_msgs:
            if type(m) not in members:
                yield pytest.param(name, m, id=f"{name}-{type(m).__name__}")


@pytest.mark.parametrize("union,msg", list(_foreign_messages()))
def test_message_of_wrong_union_rejected(union, msg):
    raw = msgspec.msgpack.encode(msg)
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.Decoder(_union(union)).decode(raw)


class _Evil:
    def __reduce__(self):
        return (exec, ("import sys; sys.modules['builtins'].TREADLE_PWNED = True",))


GARBAGE = [
    b"", b"\x00", b"\xc1", b"\xff" * 16, b"not msgpack at all", b"\x92\x01",  # truncated / odd frames
    pickle.dumps(_Evil()),
    msgspec.msgpack.encode(msgspec.msgpack.Ext(1, pickle.dumps(_Evil()))),
    msgspec.msgpack.encode({"type": "Nope"}), msgspec.msgpack.encode({"rid": "x"}),
    msgspec.msgpack.encode([1, 2, 3]), msgspec.msgpack.encode("AbortReq"), msgspec.msgpack.encode(None),
    msgspec.msgpack.encode({"type": "AbortReq", "rid": 5}),
    msgspec.msgpack.encode({"type": "GenerateBatch", "call_id": 1}),
    msgspec.msgpack.encode({"type": "GenerateBatch", "call_id": 1, "reqs": [{"rid": "a", "sampling": {"bogus": 1}}]}),
    msgspec.msgpack.encode({"type": "GenerateBatch", "call_id": 1, "reqs": [{"rid": "a", "sampling": {"top_k": "x"}}]}),
    msgspec.msgpack.encode({"type": "StepResult", "step": 1, "next_token_ids": ["a"]}),
    msgspec.msgpack.encode({"type": "ForwardPlan", "step": 1, "rows": [[0, [1], 0]]}),
    msgspec.msgpack.encode({"type": "TokenOutBatch", "outs": [["a"]]}),
    msgspec.msgpack.encode({"type": "StrOutBatch", "outs": [{"rid": "a"}]}),
]


@pytest.mark.parametrize("union", list(SAMPLES))
@pytest.mark.parametrize("raw", GARBAGE, ids=range(len(GARBAGE)))
def test_garbage_rejected_never_executed(union, raw):
    import builtins

    with pytest.raises(msgspec.DecodeError):  # ValidationError is a DecodeError
        msgspec.msgpack.Decoder(_union(union)).decode(raw)
    assert not hasattr(builtins, "TREADLE_PWNED")


def test_any_fields_keep_ext_inert():
    """An Ext inside an ``Any`` field decodes to an inert Ext object, not to what its bytes describe."""
    payload = pickle.dumps(_Evil())
    raw = msgspec.msgpack.encode({"type": "StartProfile", "call_id": 1,
                                  "options": {"x": msgspec.msgpack.Ext(1, payload)}})
    got = msgspec.msgpack.Decoder(M.TOKENIZER_IN).decode(raw)
    assert isinstance(got.options["x"], msgspec.msgpack.Ext) and got.options["x"].data == payload


def test_defaults_omitted_on_wire():
    raw = msgspec.msgpack.encode(M.GenerateReq(rid="a", text="t"))
    assert msgspec.msgpack.decode(raw) == {"type": "GenerateReq", "rid": "a", "text": "t", "sampling": {}}


# ------------------------------------------------------------------ finish_reason JSON (API.md 6.2)
@pytest.mark.parametrize("fin,expected", [
    (M.FinishReason(type="stop", matched=2), {"type": "stop", "matched": 2}),
    (M.FinishReason(type="stop", matched="</s>"), {"type": "stop", "matched": "</s>"}),
    (M.FinishReason(type="stop", matched="NaN happened"), {"type": "stop", "matched": "NaN happened"}),
    (M.FinishReason(type="length", length=16), {"type": "length", "length": 16}),
    (M.FinishReason(type="length", length=0), {"type": "length", "length": 0}),
    (M.FinishReason(type="abort", message="Abort in waiting queue"), {"type": "abort", "message": "Abort in waiting queue"}),
    (M.FinishReason(type="abort", message="Aborted"), {"type": "abort", "message": "Aborted"}),
    (M.FinishReason(type="abort", message="The request queue is full.", status_code=503),
     {"type": "abort", "message": "The request queue is full.", "status_code": 503}),
    (M.FinishReason(type="abort", message="bad", status_code=400), {"type": "abort", "message": "bad", "status_code": 400}),
])
def test_finish_reason_to_json(fin, expected):
    assert fin.to_json() == expected
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(fin), type=M.FinishReason)
    assert back == fin and back.to_json() == expected


def test_finish_reason_stop_matched_keeps_int_vs_str():
    """A token id and a stop string that looks like a number stay distinguishable over the wire."""
    for m in (7, "7"):
        back = msgspec.msgpack.decode(msgspec.msgpack.encode(M.FinishReason(type="stop", matched=m)),
                                      type=M.FinishReason)
        assert back.matched == m and type(back.matched) is type(m)
